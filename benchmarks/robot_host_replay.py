"""Does a checkpoint act the same on another machine? Record here, replay there.

  # where the checkpoint was trained (this package's pinned stack):
  .venv/bin/python benchmarks/robot_host_replay.py --record --workdir=RUN --out=DIR [--calls=200]
  # on the robot host / another machine (only the TF-free package and its deps):
  python benchmarks/robot_host_replay.py --replay --bundle=DIR [--out_md=table.md]

--record copies what the robot host reads of the latest checkpoint (pi_phi,
p_theta, meta, the text tokenizer and the checksum manifest: not the target, the
optimiser or the data position) into DIR/checkpoint, and writes DIR/episodes.npz:
`calls` random observations of the robot (an episode of 20 calls per
instruction) and the actions the Controller returned for them here, greedy
(temperature 0) at the run's beta.
--replay loads DIR/checkpoint with qsft_vla.policy on this machine's jax,
orbax and devices (the checksums are verified, as always), replays the same
episodes through a fresh Controller and reports how many actions are equal to
the recorded ones (continuous actions: within one bin width), the largest
difference, and act() latency (p50 / p99 after the warm-up).

Greedy actions are argmaxes of float32 logits: another backend (GPU kernels,
another XLA) may round differently and flip a near-tie, so a few differences
are expected; many mean the checkpoint is not read as it was written.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qsft_vla.policy import Controller, TrainedPolicy, checkpoints  # noqa: E402

_RECORD = flags.DEFINE_bool("record", False, "record a bundle from --workdir into --out")
_REPLAY = flags.DEFINE_bool("replay", False, "replay the bundle --bundle on this machine")
_WORKDIR = flags.DEFINE_string("workdir", None, "training run to record (latest step)")
_OUT = flags.DEFINE_string("out", None, "bundle folder to write (--record)")
_BUNDLE = flags.DEFINE_multi_string("bundle", [], "bundle folder(s) to replay")
_CALLS = flags.DEFINE_integer("calls", 200, "observations to record")
_OUT_MD = flags.DEFINE_string("out_md", None, "markdown table to write (--replay)")
EPISODE = 20
INSTRUCTIONS = ("go to the red ball", "pick up the puck", "open the door", "go to the box")


def _observations(spec, calls: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  obs = {c.name: rng.integers(0, 256, (calls, c.height, c.width, 3), dtype=np.uint8)
         for c in spec.cameras}
  if spec.state_dim:
    obs["state"] = rng.standard_normal((calls, spec.state_dim)).astype(np.float32)
  return obs


def _run(ctrl: Controller, obs: dict[str, np.ndarray], calls: int) -> np.ndarray:
  ctrl.reset_latency_stats()
  out = []
  for i in range(calls):
    if i % EPISODE == 0:
      ctrl.reset(INSTRUCTIONS[(i // EPISODE) % len(INSTRUCTIONS)])
    out.append(ctrl.act({k: v[i] for k, v in obs.items()}))
  return np.stack(out)


def record(workdir: str, out: str, calls: int) -> None:
  ckpt_dir, step = checkpoints.resolve(workdir)
  if os.path.exists(out):
    raise SystemExit(f"{out} exists; choose a new --out")
  dst = os.path.join(out, "checkpoint", checkpoints.SUBDIR, str(step))
  os.makedirs(dst)
  src = os.path.join(ckpt_dir, str(step))
  for item in checkpoints.INFERENCE_ITEMS:
    if os.path.isdir(os.path.join(src, item)):  # BC has no params_p
      shutil.copytree(os.path.join(src, item), os.path.join(dst, item))
  for name in os.listdir(src):  # orbax's own step-level files and the manifest
    if os.path.isfile(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
  policy = TrainedPolicy.load(os.path.join(out, "checkpoint"))
  obs = _observations(policy.robot, calls)
  ctrl = Controller(policy)
  actions = _run(ctrl, obs, calls)
  np.savez_compressed(os.path.join(out, "episodes.npz"), actions=actions, **obs)
  with open(os.path.join(out, "recorded.json"), "w") as f:
    json.dump({"machine": _machine(), "beta": ctrl.beta, "step": step, "workdir": workdir,
               "latency_ms": ctrl.latency_stats()}, f, indent=1)
  print(policy.describe())
  print(f"recorded {calls} actions into {out}")


def _machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return (f"Python {platform.python_version()}, jax {jax.__version__}, orbax-checkpoint "
          f"{getattr(orbax.checkpoint, '__version__', '?')}, {dev.platform} "
          f"({getattr(dev, 'device_kind', '')})")


def replay(bundle: str) -> dict:
  with open(os.path.join(bundle, "recorded.json")) as f:
    recorded = json.load(f)
  data = dict(np.load(os.path.join(bundle, "episodes.npz")))
  expected = data.pop("actions")
  start = time.perf_counter()
  policy = TrainedPolicy.load(os.path.join(bundle, "checkpoint"))
  ctrl = Controller(policy, beta=recorded["beta"])
  load_s = time.perf_counter() - start
  got = _run(ctrl, data, len(expected))
  tok = policy.action_tokenizer
  width = np.asarray([(d.high - d.low) / d.bins if d.kind == "continuous" else 0.0
                      for d in tok.dims], np.float32)
  diff = np.abs(got - expected)
  equal = np.all(diff <= width + 1e-6, axis=1)
  lat = ctrl.latency_stats()
  return {"bundle": os.path.basename(os.path.normpath(bundle)), "robot": policy.robot.name,
          "algorithm": policy.learner.algorithm, "architecture": policy.learner.architecture,
          "beta": ctrl.beta, "calls": len(expected), "equal": int(equal.sum()),
          "max_abs_diff": float(diff.max()), "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
          "recorded_on": recorded["machine"], "recorded_p50_ms": recorded["latency_ms"]["p50_ms"],
          "load_and_compile_s": load_s}


def main(argv) -> None:
  del argv
  if _RECORD.value == _REPLAY.value:
    raise SystemExit("give exactly one of --record and --replay")
  if _RECORD.value:
    record(_WORKDIR.value, _OUT.value, _CALLS.value)
    return
  rows = [replay(b) for b in _BUNDLE.value]
  lines = ["# Replaying recorded robot-host episodes on another machine", "",
           f"`benchmarks/robot_host_replay.py --replay` on: {_machine()}.", "",
           "| bundle | robot | learner | beta | actions equal | max abs diff | p50 ms | p99 ms "
           "| recorded on | p50 ms there |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['bundle']} | {r['robot']} | {r['algorithm']} ({r['architecture']}) | "
                 f"{r['beta']:g} | {r['equal']} / {r['calls']} | {r['max_abs_diff']:.3g} | "
                 f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recorded_on']} | "
                 f"{r['recorded_p50_ms']:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  print(json.dumps(rows, indent=1))
  if _OUT_MD.value:
    with open(_OUT_MD.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
