"""Acts in a simulator with a training run's newest policy and inserts every finished episode.

  python -m qsft_vla.replay.actor --workdir=RUN --env=babyai:BabyAI-GoToLocal-v0 \
      --server=localhost:8000 [--episodes=0] [--temperature=1.0] [--epsilon=0.1] [--seed=0]

Each episode runs the Controller of RUN's newest checkpoint (a newer one is
loaded between episodes, so the actor follows the learner), with exploration:
sampling at --temperature, and with probability --epsilon per step a uniformly
random action instead. The finished episode is recorded in the canonical layout
(envs.rollout), written as a small RLDS dataset under RUN/actors/<id>/ (online
data is kept, for later offline use, and is what the inserter reads), and
inserted through replay.insert with the run's own statistics, so online
examples get the tokens, windows and reward rescaling of offline training.
Success is logged as a rolling rate and written to RUN/actors/<id>/metrics.jsonl.
Several actors may run at once: give each its own --seed (the id defaults to it).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Any, Optional

import numpy as np
from absl import app, flags, logging

from qsft_vla.data.episode import DataError
from qsft_vla.errors import CheckpointError
from qsft_vla.learning import spec as learner_spec


class EpsilonController:
  """The Controller's action, replaced with probability epsilon by a uniformly random one."""

  def __init__(self, controller, epsilon: float, seed: int):
    from qsft_vla.evaluation.loop import RandomPolicy  # pylint: disable=g-import-not-at-top
    _check_epsilon(epsilon)
    self.controller = controller
    self.epsilon = float(epsilon)
    self._random = RandomPolicy(controller.spec, seed=seed)
    self._rng = np.random.default_rng(seed)

  def reset(self, instruction: Optional[str] = None) -> None:
    self.controller.reset(instruction)
    self._random.reset(instruction)

  def act(self, observation) -> np.ndarray:
    # The Controller always acts, so its history (window) stays that of the episode.
    action = self.controller.act(observation)
    if self.epsilon and self._rng.random() < self.epsilon:
      return self._random.act(observation)
    return action


def _check_epsilon(epsilon: float) -> None:
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f"--epsilon must be in [0, 1], got {epsilon}")


def _newest_step(workdir: str) -> Optional[int]:
  from qsft_vla.policy import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return checkpoints.resolve(workdir)[1]
  except CheckpointError:
    return None


def run(workdir: str, env_id: str, server: str, *, episodes: int = 0, temperature: float = 1.0,
        epsilon: float = 0.0, beta: Optional[float] = None, extraction: Optional[str] = None,
        seed: int = 0, actor_id: Optional[str] = None, max_steps: Optional[int] = None,
        wait_s: float = 600.0, timeout: float = 30.0, log_every: int = 10) -> dict[str, Any]:
  """Runs `episodes` episodes (0: until stopped) and inserts each; returns a summary.

  Waits up to `wait_s` seconds for RUN's first checkpoint. Episode k resets the
  env with loop.eval_reset_seed(seed + 1_000_000, k): a stream of its own,
  disjoint from the evaluation streams of qsft_vla.evaluate.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from qsft_vla import envs  # pylint: disable=g-import-not-at-top
  from qsft_vla.data.rlds_writer import RLDSWriter  # pylint: disable=g-import-not-at-top
  from qsft_vla.envs.rollout import record_episode  # pylint: disable=g-import-not-at-top
  from qsft_vla.evaluation import loop  # pylint: disable=g-import-not-at-top
  from qsft_vla.policy import TrainedPolicy  # pylint: disable=g-import-not-at-top
  from qsft_vla.policy.controller import Controller  # pylint: disable=g-import-not-at-top
  from qsft_vla.replay import insert as insert_lib  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir={workdir}: no such run directory")
  _check_epsilon(epsilon)
  try:
    envs.check_env_id(env_id)  # refused before any waiting
  except ValueError as e:
    raise ValueError(f"--env: {e}") from None
  actor_id = actor_id or f"seed{seed}"
  if not actor_id or "/" in actor_id or actor_id.startswith("."):
    raise ValueError(f"--id={actor_id!r}: must be a plain folder name")
  out = os.path.join(workdir, "actors", actor_id)
  deadline = time.time() + wait_s
  while (step := _newest_step(workdir)) is None:
    if time.time() > deadline:
      raise CheckpointError(f"--workdir={workdir}: no checkpoint appeared within {wait_s:g} s")
    time.sleep(1.0)

  # The server and its table's layout are checked before anything is acted.
  run_policy = TrainedPolicy.load(workdir, step)
  run_config = ml_collections.ConfigDict(run_policy.config)
  insert_lib.open_table(run_config, server, timeout)
  os.makedirs(out, exist_ok=True)
  _end_cut_row(os.path.join(out, "metrics.jsonl"))
  # An actor killed between keeping an episode and logging it (its row is written
  # after the insert) left an episode the table may lack: inserted again first.
  for name in _unlogged_episodes(out):
    n = insert_lib.insert(run_config, [os.path.join(out, name)], server, log_every=0,
                          timeout=timeout, stats=run_policy.statistics[0])
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"episode": _episode_index(name) + 1, "recovered": True,
                          "inserted": n}) + "\n")
    logging.info("actor %s: inserted %s, kept but not logged by an earlier run", actor_id, name)

  env = envs.make_env(env_id, seed=seed, **({} if max_steps is None else
                                           {"max_steps": max_steps}))
  recent = collections.deque(maxlen=100)
  done = inserted = 0
  # A restarted actor goes on after its earlier episodes: their data stays, and
  # its reset seeds continue the same stream rather than repeating it.
  first = 1 + max((i for i in map(_episode_index, os.listdir(out)) if i is not None),
                  default=-1)
  controller = policy = None
  stream = seed + 1_000_000
  start = time.time()
  try:
    with open(os.path.join(out, "metrics.jsonl"), "a") as metrics:
      while episodes <= 0 or done < episodes:
        step = _newest_step(workdir)
        if controller is None or step != controller.step:
          explore_seed = seed * 7919 + done
          controller = Controller.load(workdir, step=step, beta=beta, temperature=temperature,
                                       seed=explore_seed, extraction=extraction)
          cfg = ml_collections.ConfigDict(controller.policy.config)
          _check_robot(controller.spec, env, env_id)
          policy = EpsilonController(controller, epsilon, seed=explore_seed)
          logging.info("actor %s: acting with step %d of %s", actor_id, controller.step, workdir)
        index = first + done
        reset_seed = loop.eval_reset_seed(stream, index)
        episode = record_episode(env, reset_seed, policy.act, episode_id=f"{actor_id}-{index:06d}",
                                 behavior=f"actor@{controller.step}",
                                 start=lambda: policy.reset(env.instruction))
        chunk = os.path.join(out, f"episode_{index:06d}")
        with RLDSWriter(chunk, controller.spec, name="actor_episodes",
                        provenance={"tool": "qsft_vla.replay.actor", "workdir": workdir,
                                    "env": env_id, "step": controller.step,
                                    "reset_seed": reset_seed, "temperature": temperature,
                                    "epsilon": epsilon}) as writer:
          writer.add(episode)
        n = insert_lib.insert(cfg, [chunk], server, log_every=0, timeout=timeout,
                              stats=controller.policy.statistics[0])
        inserted += n
        success = bool(episode["episode_metadata"]["success"])
        recent.append(success)
        done += 1
        row = {"episode": index + 1, "step": controller.step, "success": success,
               # this episode's examples, as in a recovered row; the run's total is "inserted_total"
               "length": len(episode["steps"]["action"]), "inserted": n, "inserted_total": inserted,
               "success_rate_recent": float(np.mean(recent)), "wall_s": time.time() - start}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if log_every and done % log_every == 0:
          logging.info("actor %s: %d episodes (%.2f/min), success over the last %d: %.2f, "
                       "%d examples inserted", actor_id, done, 60 * done / (time.time() - start),
                       len(recent), np.mean(recent), inserted)
  finally:
    env.close()
  return {"episodes": done, "inserted": inserted,
          "success_rate_recent": float(np.mean(recent)) if recent else None}


def _end_cut_row(path: str) -> None:
  """A row cut short by a kill stays unreadable on its own line, not glued to the next."""
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      last = f.read(1)
    if last != b"\n":
      with open(path, "a") as f:
        f.write("\n")


def _episode_index(name: str) -> Optional[int]:
  """N of a kept episode's folder episode_NNNNNN; None for anything else."""
  digits = name[len("episode_"):]
  return int(digits) if name.startswith("episode_") and digits.isdigit() else None


def _unlogged_episodes(out: str) -> list[str]:
  """The kept episodes (episode_NNNNNN) that metrics.jsonl has no row for."""
  logged = set()
  path = os.path.join(out, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          logged.add(int(json.loads(line)["episode"]) - 1)
        except (ValueError, KeyError, TypeError):
          continue  # a row cut short by a kill
  return sorted(n for n in os.listdir(out)
                if _episode_index(n) is not None and _episode_index(n) not in logged)


def _check_robot(spec, env, env_id: str) -> None:
  if spec.action_dim != env.action_dim:
    raise ValueError(f"--env={env_id} acts with {env.action_dim} action dims but the run's "
                     f"robot {spec.name!r} has {spec.action_dim}")


def _define_flags():
  flags.DEFINE_string("workdir", None, "the training run whose newest checkpoint acts")
  flags.DEFINE_string("env", None, "simulator task, e.g. babyai:BabyAI-GoToLocal-v0")
  flags.DEFINE_string("server", None, "replay server address, HOST:PORT")
  flags.DEFINE_integer("episodes", 0, "episodes to run; 0 = until stopped")
  flags.DEFINE_float("temperature", 1.0, "sampling temperature of the Controller (0 = argmax)")
  flags.DEFINE_float("epsilon", 0.0, "per-step chance of a uniformly random action")
  flags.DEFINE_float("beta", None, "Controller beta (default: the run's)")
  flags.DEFINE_enum("extraction", None, list(learner_spec.EXTRACTIONS),
                    "policy extraction (default: the run's)")
  flags.DEFINE_integer("seed", 0, "actor seed: its episodes and its exploration")
  flags.DEFINE_string("id", None, "actor name under RUN/actors/ (default: seed<seed>)")
  flags.DEFINE_integer("max_steps", None, "episode time limit (default: the env's)")
  flags.DEFINE_float("wait", 600.0, "seconds to wait for the run's first checkpoint")
  flags.DEFINE_float("timeout", 30.0, "seconds to wait for the replay server to answer")
  flags.mark_flags_as_required(["workdir", "env", "server"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    summary = run(f.workdir, f.env, f.server, episodes=f.episodes, temperature=f.temperature,
                  epsilon=f.epsilon, beta=f.beta, extraction=f.extraction, seed=f.seed,
                  actor_id=f.id, max_steps=f.max_steps, wait_s=f.wait, timeout=f.timeout)
  except (CheckpointError, DataError, OSError, ValueError) as e:
    print(f"replay.actor: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
