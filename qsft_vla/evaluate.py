"""Closed-loop evaluation of a checkpoint in simulation: success rate with a 95% interval, videos.

  python -m qsft_vla.evaluate --workdir=DIR [--env=babyai:BabyAI-GoToLocal-v0] \\
      [--episodes=50] [--seed=1000] [--beta=4.0] [--temperature=0] [--checkpoint_step=K] \\
      [--video_episodes=3] [--max_steps=64]
  python -m qsft_vla.evaluate --server=HOST:PORT [--token_file=F] (--workdir=DIR | --out_dir=D) ...

The policy is the robot-host Controller (the same code a robot runs), driven
by evaluation.loop: episode i is reset from (seed, i) only, so every checkpoint,
algorithm and beta evaluated with one seed sees the same initial states
(paired comparisons). Unset flags take the run's own `eval` config section
stored in the checkpoint (env, episodes, seed, max_steps, video_episodes);
beta defaults to the run's learner.beta (0 for BC / filtered BC).

Writes DIR/eval/<task>-seed<S>.json (<task>: the name part of the env id, e.g.
BabyAI-GoToLocal-v0). With an explicit --beta the stem is
<task>-seed<S>-beta<B>, so a beta sweep keeps every result. GIFs of the first
episodes go to DIR/eval/videos/<stem>/ (a rerun replaces them). DIR is the
run's workdir even when --workdir names its checkpoints/ or a step directory.

With --server the policy is the one qsft_vla.serve serves, driven through
qsft_vla.client.PolicyClient exactly as a remote robot drives it: the same
episodes give the same numbers as evaluating the checkpoint here. beta,
extraction, temperature and the step are then the server's; defaults come
from the eval config its run sent; the stem ends in "-server".
`run()` does the same without absl. TF-free.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from typing import Any, Optional

from qsft_vla import config as qconfig
from qsft_vla import envs
from qsft_vla import paths
from qsft_vla.learning import spec as learner_spec
from qsft_vla.robot import RobotSpec
from qsft_vla.policy import Controller, ControllerError, TrainedPolicy, checkpoints
from qsft_vla.evaluation import loop, outcomes



def output_stem(env: str, seed: int, beta: Optional[float] = None,
                extraction: Optional[str] = None) -> str:
  """<task>-seed<S>[-<extraction>][-beta<B>]: the file name (without .json) of one evaluation."""
  _, task = envs.parse_env_id(env)
  stem = f"{task.replace(':', '-')}-seed{int(seed)}"   # BabyAI-PickupLoc-v0:strict
  if extraction is not None:
    stem += f"-{extraction}"
  return stem if beta is None else f"{stem}-beta{float(beta)!r}"


def label(algorithm: str, beta: float, temperature: float, extraction: str = "p") -> str:
  """The table row name: "qsft (beta=4.0)", "qsft (ratio, beta=16.0)", "bc", ..."""
  parts = [f"beta={beta!r}"] if algorithm == "qsft" else []
  if algorithm == "qsft" and extraction != "p":
    parts.insert(0, extraction)
  if temperature > 0:
    parts.append(f"T={temperature!r}")
  return f"{algorithm} ({', '.join(parts)})" if parts else algorithm


def run(workdir: Optional[str] = None, env: Optional[str] = None,
        episodes: Optional[int] = None, seed: Optional[int] = None,
        beta: Optional[float] = None, temperature: float = 0.0,
        checkpoint_step: Optional[int] = None, video_episodes: Optional[int] = None,
        max_steps: Optional[int] = None, progress: bool = True,
        extraction: Optional[str] = None, server: Optional[str] = None,
        token: Optional[str] = None, out_dir: Optional[str] = None,
        sample_proposal: Optional[str] = None) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir`, or the policy qsft_vla.serve serves at
  `server` ("HOST:PORT", with its `token`); writes and returns the result dict.

  None means: from the checkpoint's eval config (env, episodes, seed,
  max_steps, video_episodes; a server sends its run's), the run's
  learner.extraction and its beta, the latest step (checkpoint_step), the run's
  learner.sample_proposal (for "sample"). beta, extraction, sample_proposal,
  temperature and checkpoint_step are the server's own when it
  serves: giving them with `server` is an error. out_dir: where the JSON and
  videos go (default <workdir>/eval; needed with a server and no workdir).
  Returns outcomes.summarize's fields (success_rate, ci_low, ci_high, episodes,
  successes, mean/std return and length) plus what was evaluated, per_episode
  results, latency per act() (through a server: the round trip), timings and
  the paths written ("json", "video_dir").
  """
  start = time.time()
  if server is None:
    if workdir is None:
      raise ValueError("give --workdir (a training run) or --server (HOST:PORT of "
                       "qsft_vla.serve)")
    actor, about = _local_policy(workdir, checkpoint_step, beta, temperature, extraction, seed,
                                 sample_proposal)
  else:
    given = [name for name, value in (("beta", beta), ("extraction", extraction),
                                      ("checkpoint_step", checkpoint_step),
                                      ("sample_proposal", sample_proposal)) if value is not None]
    given += ["temperature"] if temperature else []
    if given:
      raise ValueError(f"--{', --'.join(given)}: the server's own (start qsft_vla.serve with "
                       "them); not settable per evaluation")
    if workdir is None and out_dir is None:
      raise ValueError("--server needs --out_dir (or --workdir) for the results")
    actor, about = _remote_policy(server, token)
  try:
    eval_cfg = about.pop("eval_cfg")
    env = env or eval_cfg.get("env")
    if not env:
      raise ValueError(f"{about['checkpoint']}: no --env given and the checkpoint's config "
                       "has no eval.env")
    episodes = eval_cfg["episodes"] if episodes is None else episodes
    seed = eval_cfg["seed"] if seed is None else seed
    max_steps = eval_cfg["max_steps"] if max_steps is None else max_steps
    video_episodes = eval_cfg["video_episodes"] if video_episodes is None else video_episodes
    if isinstance(episodes, bool) or int(episodes) != episodes or episodes < 1:
      raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    _check_robot(about.pop("robot"), about["checkpoint"], env)

    load_seconds = time.time() - start
    if out_dir is None:
      # <workdir>/checkpoints/<step> for a local checkpoint; the workdir as given otherwise.
      out_dir = os.path.join(about["workdir"] or _run_root(workdir), "eval")
    stem = output_stem(env, seed, beta, extraction) + ("-server" if server else "")
    video_dir = os.path.join(out_dir, "videos", stem)
    try:  # before the episodes, not after them (a read-only workdir fails at once)
      paths.check_writable_folder(out_dir)
    except OSError as e:
      raise OSError(f"{out_dir}: cannot write the results here ({e})") from None
    for old in glob.glob(os.path.join(video_dir, "episode_*.gif")):
      os.remove(old)
    summary, per_episode = loop.evaluate(env, actor, int(episodes), int(seed),
                                         max_steps=max_steps, video_episodes=int(video_episodes),
                                         video_dir=video_dir, progress=progress)
    latency = actor.latency_stats()
  finally:
    if server is not None:
      actor.close()
  result = {
      **summary,
      "label": label(about["algorithm"], about["beta"], about["temperature"],
                     about["extraction"]),
      "env": env, **about, "server": server,
      "video_episodes": int(video_episodes),
      "latency_ms": latency,
      "load_seconds": load_seconds, "total_seconds": time.time() - start,
      "json": os.path.join(out_dir, stem + ".json"),
      "video_dir": video_dir if video_episodes else None,
      "per_episode": per_episode,
  }
  _write_json(result["json"], result)
  return result


def _run_root(path: str) -> str:
  """The workdir of a path to it, its checkpoints/ or one step directory."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit():
    path = os.path.dirname(path)
  return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def _local_policy(workdir, checkpoint_step, beta, temperature, extraction, seed,
                  sample_proposal=None):
  """(Controller, what it is) for a checkpoint; a damaged latest step falls back."""
  try:
    policy = TrainedPolicy.load(workdir, checkpoint_step)
  except checkpoints.DamagedCheckpointError:
    if checkpoint_step is not None:
      raise  # a step asked for by name is never replaced
    # The latest step is damaged: the newest intact one, with a warning.
    step, skipped = checkpoints.newest_intact(workdir, checkpoints.INFERENCE_ITEMS)
    for message in skipped:
      print(f"WARNING: skipping a damaged checkpoint: {message}", file=sys.stderr)
    policy = TrainedPolicy.load(workdir, step)
  # The schema's defaults where a checkpoint's config lacks an eval field.
  eval_cfg = {**qconfig.eval_defaults().to_dict(), **(policy.config.get("eval") or {})}
  run_seed = eval_cfg["seed"] if seed is None else seed
  controller = Controller(policy, beta=beta, temperature=temperature, seed=int(run_seed),
                          extraction=extraction, sample_proposal=sample_proposal)
  return controller, {
      "eval_cfg": eval_cfg, "robot": policy.robot, "algorithm": policy.learner.algorithm,
      "architecture": policy.learner.architecture, "extraction": controller.extraction,
      "sampling": controller.sampling,
      "beta": controller.beta, "temperature": controller.temperature,
      "checkpoint_step": policy.step, "checkpoint": policy.path,
      "workdir": os.path.dirname(os.path.dirname(policy.path))}  # <workdir>/checkpoints/<step>


def _remote_policy(server: str, token: Optional[str]):
  """(PolicyClient, what it serves) for qsft_vla.serve at HOST:PORT."""
  from qsft_vla.client import PolicyClient  # pylint: disable=g-import-not-at-top
  host, sep, port = server.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"--server must be HOST:PORT, got {server!r}")
  client = PolicyClient(host, int(port), token=token)
  meta = client.metadata()
  try:
    robot = RobotSpec.from_config(meta["robot"], where=f"{client.url} metadata")
  except (KeyError, TypeError) as e:
    client.close()
    raise ValueError(f"{client.url}: metadata without a robot ({e!r})") from None
  eval_cfg = {**qconfig.eval_defaults().to_dict(), **(meta.get("eval") or {})}
  return client, {
      "eval_cfg": eval_cfg, "robot": robot, "algorithm": meta.get("algorithm"),
      "architecture": None, "extraction": meta.get("extraction"), "sampling": meta.get("sampling"),
      "beta": meta.get("beta"),
      "temperature": meta.get("temperature"), "checkpoint_step": meta.get("checkpoint_step"),
      "checkpoint": f"{client.url} (run {meta.get('run')})", "workdir": None}


def _check_robot(robot: RobotSpec, where: str, env: str) -> None:
  """The env's robot must be the one the checkpoint was trained for."""
  env_spec = envs.robot_spec_for(env)

  def shape(spec):
    return {"cameras": {c.name: (c.height, c.width) for c in spec.cameras},
            "state_dim": spec.state_dim,
            "action": [(d.name, d.kind, d.bins) for d in spec.action_dims]}

  if shape(robot) != shape(env_spec):
    raise ValueError(f"{where}: the checkpoint is for robot {robot.name!r} "
                     f"{shape(robot)}, but {env} is robot {env_spec.name!r} "
                     f"{shape(env_spec)}")


def _finite_or_none(x):
  """JSON has no NaN/Inf: they become null (strict parsers reject NaN)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  return x


def _write_json(path: str, obj) -> None:
  """Written under a temporary name and renamed: never a half-written result."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(_finite_or_none(obj), f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def _read_token(path: str) -> str:
  from qsft_vla import serve  # pylint: disable=g-import-not-at-top
  return serve.read_token(path)


def format_result(result: dict[str, Any]) -> str:
  lat = result["latency_ms"]
  where = result["workdir"] if result.get("server") is None else result["checkpoint"]
  per_act = "round trip per act() through the server" if result.get("server") else \
      "controller latency per act()"
  return "\n".join([
      f"{result['env']}: checkpoint step {result['checkpoint_step']} of {where}, "
      f"seed {result['seed']}",
      outcomes.format_table({result["label"]: result}),
      f"{per_act}: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms "
      f"over {lat['calls']} calls",
      *_estimate_lines(result),
      f"wrote {result['json']}" + (f" and videos in {result['video_dir']}"
                                   if result["video_dir"] else ""),
  ])


def _estimate_lines(result: dict[str, Any]) -> list[str]:
  """The policy's own success estimates and how well they predict success (Q-SFT only)."""
  if "mean_success_estimate_first" not in result:
    return []
  auc = lambda a: "n/a (one outcome only)" if a is None else f"{a:.3f}"  # noqa: E731
  return [f"success estimate (clipped p/pi of the whole action): first step mean "
          f"{result['mean_success_estimate_first']:.3f}, AUC {auc(result['auc_first'])}; "
          f"episode mean {result['mean_success_estimate_mean']:.3f}, "
          f"AUC {auc(result['auc_mean'])}"]


# --------------------------------------------------------------------------- #
# Binary.


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/ or a step "
                      "directory); with --server, only where the results go.")
  flags.DEFINE_string("server", None, "HOST:PORT of a running qsft_vla.serve: evaluate the "
                      "policy it serves, through qsft_vla.client (the robot's path).")
  flags.DEFINE_string("token_file", None, "The server's token file (with --server).")
  flags.DEFINE_string("out_dir", None, "Where the JSON and videos go (default: <workdir>/eval).")
  flags.DEFINE_string("env", None, "Environment id, e.g. babyai:BabyAI-GoToLocal-v0 or "
                      "metaworld:pick-place-v3 (default: the run's eval.env).")
  flags.DEFINE_integer("episodes", None, "Episodes (default: the run's eval.episodes).")
  flags.DEFINE_integer("seed", None, "Episode i is reset from (seed, i) (default: eval.seed).")
  flags.DEFINE_float("beta", None, "Q-SFT beta (default: the run's learner.beta; 0 for BC). "
                     "Given explicitly, it is part of the output file name.")
  flags.DEFINE_enum("extraction", None, list(learner_spec.EXTRACTIONS), "Q-SFT policy "
                    "extraction (default: the run's learner.extraction): p = pi * exp(beta * p), "
                    "ratio = pi * exp(beta * p / pi) on the support, sample = the best of "
                    "learner.sample_k actions drawn from pi (and p) by log pi + beta * "
                    "implied Q. Given explicitly, it is part of the output file name.")
  flags.DEFINE_enum("sample_proposal", None, list(learner_spec.SAMPLE_PROPOSALS),
                    "Where extraction sample draws its candidates (default: the run's "
                    "learner.sample_proposal): pi+p = half from pi, half from p; pi = all "
                    "from pi. Recorded in the JSON (sampling), not in the file name.")
  flags.DEFINE_float("temperature", 0.0, "0: argmax; > 0: sample.")
  flags.DEFINE_integer("checkpoint_step", None, "Step to evaluate (default: the latest).")
  flags.DEFINE_integer("video_episodes", None, "GIFs of the first N episodes "
                       "(default: eval.video_episodes).")
  flags.DEFINE_integer("max_steps", None, "Time limit below the env's (default: eval.max_steps).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
  if len(argv) > 1:
    print(f"evaluate: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 1
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  from qsft_vla.client import ServerError  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f["verbosity"].present:  # orbax logs every file it restores at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    result = run(f.workdir, env=f.env, episodes=f.episodes, seed=f.seed, beta=f.beta,
                 temperature=f.temperature, checkpoint_step=f.checkpoint_step,
                 video_episodes=f.video_episodes, max_steps=f.max_steps, progress=f.progress,
                 extraction=f.extraction, server=f.server, out_dir=f.out_dir,
                 sample_proposal=f.sample_proposal,
                 token=_read_token(f.token_file) if f.token_file else None)
  except (ValueError, OSError, ControllerError, ServerError) as e:  # bad flags, checkpoint, env; refused acts
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 1
  print(format_result(result))
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
