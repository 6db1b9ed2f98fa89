"""Generates a simulated offline dataset from a mixture of behaviour policies.

  python -m data_tools.generate --env=babyai:BabyAI-GoToLocal-v0 --episodes=200 \
      --behavior=expert:0.25,distractor:0.6,random:0.15 --seed=0 --out=/tmp/gotolocal_mix
  python -m data_tools.generate --env=metaworld:pick-place-v3 --episodes=20 \
      --noise=0.0,0.1,0.3 --out=/tmp/mw_pick_place

Each episode is rolled out by one behaviour (qsft_vla.envs.behaviors: expert,
noisy@P, random, quitter@F, and the simulator's systematic ones, BabyAI
`distractor` and Meta-World `biased@CM`) and written as RLDS with TFDS in our
schema (DESIGN.md): sparse reward 1 on success, is_terminal on success (or an
unrecoverable failure), a truncated last step on the time limit or when a
behaviour has finished its own (wrong) goal, and episode metadata (episode_id,
source, noise, behavior, success, return). `--behavior` splits the episodes by
weight (exact counts, order shuffled by --seed). The legacy `--noise=a,b,c`
is the mixture of noisy@a, noisy@b, ... (0 = expert) with episode i at
level i mod len(--noise).

Deterministic: episode i depends only on (--seed, i) through
np.random.SeedSequence([seed, i]), never on --workers. Workers are spawned
processes that import only TF-free modules and roll out episodes; the main
process writes them in index order through RLDSWriter, under a temporary name
renamed only when complete (a failure leaves nothing at --out). The dataset's
statistics are cached beside it (qsft_vla.data.statistics), as the converter does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.util
import os
import re
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (CLI noise)

import numpy as np  # pylint: disable=g-import-not-at-top
import tqdm  # pylint: disable=g-import-not-at-top

from data_tools import cli  # pylint: disable=g-import-not-at-top  (TF-free)
from qsft_vla import envs  # pylint: disable=g-import-not-at-top  (TF-free)
from qsft_vla.envs import behaviors as behaviors_lib  # pylint: disable=g-import-not-at-top
from qsft_vla.envs.rollout import record_episode  # pylint: disable=g-import-not-at-top

IMAGE_ENCODINGS = ("png", "jpeg")
DEFAULT_ENV = "babyai:BabyAI-GoToLocal-v0"


def default_workers() -> int:
  """The CPUs this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def episode_seeds(seed: int, index: int) -> tuple[int, np.random.Generator]:
  """(reset seed, expert rng) of episode `index`: a function of (seed, index) only."""
  env_ss, expert_ss = np.random.SeedSequence([seed, index]).spawn(2)
  return int(env_ss.generate_state(1)[0]), np.random.default_rng(expert_ss)


# --------------------------------------------------------------------------- #
# Rollouts (run in the workers, or in-process with one worker).


class _Roller:
  """Holds one environment and rolls out episodes by index."""

  def __init__(self, env_id: str, max_steps: int | None, seed: int):
    kwargs = {} if max_steps is None else {"max_steps": max_steps}
    self.env = envs.make_env(env_id, seed=seed, **kwargs)
    self.seed = seed

  def __call__(self, job: tuple[int, behaviors_lib.Behavior]) -> dict[str, Any]:
    index, behavior = job
    reset_seed, rng = episode_seeds(self.seed, index)
    actor = behaviors_lib.EpisodeActor(self.env, behavior, rng)
    return record_episode(self.env, reset_seed, actor.act, episode_id=f"{index:06d}",
                          noise=behavior.noise, behavior=behavior.label, start=actor.start,
                          stop=actor.done)

  def close(self):
    self.env.close()


_WORKER_ROLLER: _Roller | None = None
_WORKER_ERROR: BaseException | None = None


def _init_worker(env_id: str, max_steps: int | None, seed: int) -> None:
  global _WORKER_ROLLER, _WORKER_ERROR
  try:
    _WORKER_ROLLER = _Roller(env_id, max_steps, seed)
  except Exception as e:  # pylint: disable=broad-except
    # A failing Pool initializer makes the pool respawn workers forever;
    # report the error with the first episode instead.
    _WORKER_ERROR = e
    return
  # Runs when the worker exits normally (pool.close + join): frees the
  # simulator's rendering context before the interpreter goes away.
  multiprocessing.util.Finalize(None, _WORKER_ROLLER.close, exitpriority=10)


def _rollout_in_worker(job: tuple[int, behaviors_lib.Behavior]) -> dict[str, Any]:
  if _WORKER_ERROR is not None:
    raise _WORKER_ERROR
  return _WORKER_ROLLER(job)


# --------------------------------------------------------------------------- #
# The generator.


def _check_args(env_id, episodes, noise_levels, seed, max_steps, workers, image_encoding):
  envs.check_env_id(env_id)
  if not isinstance(episodes, int) or episodes < 1:
    raise ValueError(f"--episodes must be a positive integer, got {episodes!r}")
  if noise_levels is not None:
    if not noise_levels:
      raise ValueError("--noise must list at least one noise level")
    for x in noise_levels:
      if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0):
        raise ValueError(f"--noise levels must be finite numbers >= 0, got {x!r}")
      if env_id.startswith("babyai:") and x > 1:
        raise ValueError(f"--noise levels are probabilities in [0, 1] for BabyAI, got {x!r}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
  if max_steps is not None and max_steps < 1:
    raise ValueError(f"--max_steps must be >= 1, got {max_steps}")
  if workers is not None and workers < 1:
    raise ValueError(f"--workers must be >= 1, got {workers}")
  if image_encoding not in IMAGE_ENCODINGS:
    raise ValueError(f"--image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}")


def plan(env_id: str, episodes: int, seed: int, noise_levels: Sequence[float] | None = None,
         behavior: str | None = None) -> list[tuple[int, behaviors_lib.Behavior]]:
  """(episode index, behaviour) for every episode: from --behavior, else --noise."""
  if behavior is not None:
    if noise_levels is not None:
      raise ValueError("give --behavior or --noise, not both (noisy@P is a behaviour)")
    adapter = envs.adapter_class(env_id)
    mixture = behaviors_lib.parse(behavior, env_id, adapter.SYSTEMATIC)
    return list(enumerate(behaviors_lib.assign(mixture, episodes, seed)))
  levels = [0.0] if noise_levels is None else [float(x) for x in noise_levels]
  return [(i, behaviors_lib.Behavior("expert") if levels[i % len(levels)] == 0
           else behaviors_lib.Behavior("noisy", levels[i % len(levels)]))
          for i in range(episodes)]


def generate(env_id: str, episodes: int, noise_levels: Sequence[float] | None, seed: int,
             out: str, *, behavior: str | None = None, max_steps: int | None = None, workers: int | None = None,
             image_encoding: str = "png", overwrite: bool = False,
             episodes_per_shard: int = 100, compute_stats: bool = True, progress: bool = True,
             provenance: dict[str, Any] | None = None,
             disagreement_episodes: int = 0) -> dict[str, Any]:
  """Rolls out `episodes` noisy expert episodes of `env_id` and writes them to `out`.

  Args:
    env_id: "babyai:<level>" or "metaworld:<task>-v3" (qsft_vla.envs).
    episodes: number of episodes.
    noise_levels: legacy mixture (None with `behavior`): episode i is noisy@x
      with x = noise_levels[i % len(noise_levels)] (BabyAI: probability of a
      random action; Meta-World: std of the Gaussian action noise); 0 = expert.
    behavior: the mixture "NAME[@PARAM]:WEIGHT,..." (envs.behaviors).
    seed: episode i depends only on (seed, i).
    out: dataset directory to create (must not exist unless overwrite).
    max_steps: time limit override (default: the adapter's).
    workers: rollout processes (default: the CPUs available); 1 = in this process.
    image_encoding: "png" (lossless) or "jpeg".
    provenance: extra entries for the dataset's provenance file (e.g. all flags).
    disagreement_episodes: estimate the mixture's greedy-behaviour disagreement
      on this many noise-free expert episodes (envs.behaviors.greedy_disagreement;
      0 = skip); it goes to the summary and the provenance file.

  Returns:
    The summary dict (format_summary prints it).
  """
  start = time.perf_counter()
  if noise_levels is not None:
    noise_levels = [float(x) for x in noise_levels]
  _check_args(env_id, episodes, noise_levels, seed, max_steps, workers, image_encoding)
  jobs = plan(env_id, episodes, seed, noise_levels, behavior)
  out = os.path.abspath(out)
  if os.path.lexists(out):  # before any work; the writer checks again
    if not overwrite:
      raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    from qsft_vla.data.rlds_writer import check_replaceable  # pylint: disable=g-import-not-at-top
    check_replaceable(out)
  workers = min(workers or default_workers(), episodes)
  spec = envs.robot_spec_for(env_id)
  per_behavior = {b.label: {"episodes": 0, "successes": 0, "steps": 0, "return": 0.0}
                  for _, b in sorted(jobs, key=lambda j: j[1].label)}
  mixture = (behavior if behavior is not None else
             f"noise levels {noise_levels or [0.0]}, episode i at level i mod {len(noise_levels or [0])}")

  with contextlib.ExitStack() as stack:
    if workers > 1:
      # spawn: workers start from a fresh interpreter, never a copy of this
      # process's TensorFlow state (the writer imports TF below).
      pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
          workers, _init_worker, (env_id, max_steps, seed)))
      episodes_iter = pool.imap(_rollout_in_worker, jobs)  # ordered: written in index order
    else:
      roller = _Roller(env_id, max_steps, seed)
      stack.callback(roller.close)
      episodes_iter = map(roller, jobs)
    # TF is imported only here, in the main process, while the workers start.
    from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
    from qsft_vla.data.rlds_writer import RLDSWriter  # pylint: disable=g-import-not-at-top

    record = {"tool": "data_tools.generate", "env": env_id, "episodes": episodes,
              "noise": noise_levels, "behavior": behavior, "seed": seed, "max_steps": max_steps, "workers": workers,
              "image_encoding": image_encoding, "overwrite": overwrite,
              "episode_seeds": "SeedSequence([seed, index]).spawn(2): reset seed, expert rng",
              "behavior_schedule": ("envs.behaviors.assign: counts by weight, order shuffled "
                                    "by seed" if behavior is not None else
                                    "episode i uses noise[i % len(noise)]")}
    record.update(provenance or {})
    disagreement = None
    if disagreement_episodes:
      disagreement = _disagreement(env_id, max_steps, seed, [b for _, b in jobs], spec,
                                   disagreement_episodes)
      record["greedy_behavior_disagreement"] = disagreement
    name = re.sub(r"[^a-z0-9_]", "_", env_id.lower())
    acc = statistics.Accumulator(spec) if compute_stats else None
    first_episode_s = None
    with RLDSWriter(out, spec, name=name, provenance=record, overwrite=overwrite,
                    episodes_per_shard=episodes_per_shard, image_encoding=image_encoding,
                    description=f"{env_id}: behaviours {mixture} (data_tools.generate)") as writer:
      with tqdm.tqdm(total=episodes, unit="ep", desc="generate", disable=not progress,
                     file=sys.stderr) as bar:
        for (index, b), episode in zip(jobs, episodes_iter):
          if first_episode_s is None:
            first_episode_s = time.perf_counter() - start
          writer.add(episode, where=f"episode {index} ({b.label})")
          if acc is not None:
            acc.add(episode, f"episode {index}")
          md, length = episode["episode_metadata"], len(episode["steps"]["action"])
          p = per_behavior[b.label]
          p["episodes"] += 1
          p["successes"] += bool(md["success"])
          p["steps"] += length
          p["return"] += md["return"]
          bar.update(1)
          bar.set_postfix(steps_per_s=f"{writer.num_steps / (time.perf_counter() - start):.0f}",
                          success=f"{sum(v['successes'] for v in per_behavior.values()) / (index + 1):.2f}",
                          refresh=False)
    if workers > 1:
      pool.close()  # let the workers exit normally (they close their simulators)
      pool.join()

  stats_path = statistics.save(writer.out, spec, acc.result(writer.out)) if acc else None
  wall = time.perf_counter() - start
  size = cli.dir_bytes(writer.out)
  steps = writer.num_steps
  return {
      "out": writer.out, "env": env_id, "episodes": writer.num_episodes, "steps": steps,
      "success_rate": sum(p["successes"] for p in per_behavior.values()) / writer.num_episodes,
      "per_behavior": {x: {"episodes": p["episodes"], "steps": p["steps"],
                           "success_rate": p["successes"] / max(p["episodes"], 1),
                           "mean_return": p["return"] / max(p["episodes"], 1),
                           "mean_length": p["steps"] / max(p["episodes"], 1)}
                       for x, p in per_behavior.items()},
      "workers": workers, "wall_s": wall, "startup_s": first_episode_s or 0.0,
      "env_steps_per_s": steps / wall, "bytes": size,
      "bytes_per_1k_steps": size * 1000.0 / max(steps, 1), "stats_path": stats_path,
      "greedy_behavior_disagreement": disagreement,
  }


def _disagreement(env_id, max_steps, seed, assigned, spec, episodes) -> dict[str, float]:
  """envs.behaviors.greedy_disagreement of the mixture as assigned (episode shares)."""
  labels = sorted({b.label for b in assigned})
  mixture = [dataclasses.replace(next(b for b in assigned if b.label == l),
                                 weight=sum(b.label == l for b in assigned)) for l in labels]
  bins = [d.bins for d in spec.action_dims]
  kwargs = {} if max_steps is None else {"max_steps": max_steps}
  with envs.make_env(env_id, seed=seed, **kwargs) as env:
    return behaviors_lib.greedy_disagreement(env, mixture, episodes, seed, bins)


def format_summary(s: dict[str, Any]) -> str:
  lines = [f"wrote {s['out']} ({s['env']})",
           f"  episodes {s['episodes']}, steps {s['steps']}, success rate {s['success_rate']:.3f}"]
  for label, p in s["per_behavior"].items():
    lines.append(f"  {label}: {p['episodes']} episodes, {p['steps']} steps, success rate "
                 f"{p['success_rate']:.3f}, mean length {p['mean_length']:.1f}, "
                 f"mean return {p['mean_return']:.3f}")
  d = s.get("greedy_behavior_disagreement")
  if d:
    lines.append(f"  greedy-behaviour disagreement {d['disagreement']:.3f}: on {d['states']} "
                 "states of noise-free expert episodes, the share where the mixture's most "
                 "likely action is not the expert's")
  lines.append(f"  wall {s['wall_s']:.1f} s ({s['startup_s']:.1f} s to the first episode), "
               f"{s['env_steps_per_s']:.0f} env steps/s with {s['workers']} worker(s)")
  lines.append(f"  {s['bytes']:,} bytes on disk, {s['bytes_per_1k_steps']:,.0f} bytes per 1k steps")
  if s["stats_path"]:
    lines.append(f"  statistics: {s['stats_path']}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Binary.

_FLAG_NAMES = ("env", "episodes", "noise", "behavior", "seed", "out", "max_steps", "workers",
               "image_encoding", "overwrite", "episodes_per_shard", "stats",
               "disagreement_episodes")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("env", DEFAULT_ENV, "Environment id: babyai:<BabyAI level> or "
                      "metaworld:<task>-v3.")
  flags.DEFINE_integer("episodes", 100, "Number of episodes.")
  flags.DEFINE_list("noise", None, "Legacy mixture: noise levels, mixed evenly over the "
                    "episodes (BabyAI: random-action probability; Meta-World: Gaussian action "
                    "std; 0 = expert). Default (without --behavior): 0.")
  flags.DEFINE_string("behavior", None, "Behaviour mixture NAME[@PARAM]:WEIGHT,... (expert, "
                      "noisy@P, random, quitter@F; BabyAI distractor; Meta-World biased@CM), "
                      "e.g. expert:0.25,distractor:0.6,random:0.15.")
  flags.DEFINE_integer("seed", 0, "Episode i depends only on (seed, i).")
  flags.DEFINE_string("out", None, "Dataset directory to create.", required=True)
  flags.DEFINE_integer("max_steps", None, "Time limit override (default: the environment's; "
                       "Meta-World: 200).")
  flags.DEFINE_integer("workers", None, "Rollout processes (default: the CPUs available).")
  flags.DEFINE_enum("image_encoding", "png", list(IMAGE_ENCODINGS), "Image encoding.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out (only once complete).")
  flags.DEFINE_integer("episodes_per_shard", 100, "Episodes per TFRecord shard.")
  flags.DEFINE_bool("stats", True, "Compute and cache the dataset statistics.")
  flags.DEFINE_integer("disagreement_episodes", 20, "Estimate the greedy-behaviour "
                       "disagreement on this many noise-free expert episodes (0: skip).")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS

  def work():
    noise = None
    if f.noise is not None:
      try:
        noise = [float(x) for x in f.noise]
      except ValueError:
        raise ValueError(f"--noise must be a comma-separated list of numbers, got {f.noise}")
    return format_summary(generate(
        f.env, f.episodes, noise, f.seed, f.out, behavior=f.behavior, max_steps=f.max_steps, workers=f.workers,
        image_encoding=f.image_encoding, overwrite=f.overwrite,
        episodes_per_shard=f.episodes_per_shard, compute_stats=f.stats,
        disagreement_episodes=f.disagreement_episodes,
        provenance={"flags": {n: f[n].value for n in _FLAG_NAMES}}))

  return cli.run("generate", work)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
