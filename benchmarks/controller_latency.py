"""Controller latency per act() (what a robot host pays per control step).

  .venv/bin/python benchmarks/controller_latency.py [--calls=500] \
      [--out=benchmarks/results/controller_latency.md]

For each robot config (default model sizes of the config) and architecture,
builds the learner's initial params (latency does not depend on the values),
wraps them in the robot-host Controller exactly as Controller.load would, and
times `calls` act() calls on random observations after the warm-up, with a
reset every 50 calls (a new episode: the history restarts). Reported: p50 and
p99 per call, end to end (input checks, host->device copy, prefix encoding,
D decoding steps for pi_phi and p_theta, decode to float actions, bounds guard).
"""

from __future__ import annotations

import os
import platform
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import config as qconfig  # noqa: E402
from qsft_vla import train  # noqa: E402
from qsft_vla.controller import Controller  # noqa: E402

_CALLS = flags.DEFINE_integer("calls", 500, "act() calls per controller (after warm-up)")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")

CASES = (("robot_configs/babyai.py", "qsft", "separate"),
         ("robot_configs/babyai.py", "qsft", "shared"),
         ("robot_configs/babyai.py", "bc", "separate"),
         ("robot_configs/metaworld.py", "qsft", "separate"),
         ("robot_configs/metaworld.py", "qsft", "shared"),
         ("robot_configs/metaworld.py", "bc", "separate"))


def controller_for(path: str, variant: str, architecture: str):
  """(Controller, model config) for a config's default model."""
  cfg = qconfig.load_config_file(f"{path}:{variant}")
  cfg.learner.architecture = architecture
  setup = train.build(cfg, stats=[None])
  state = setup.init_state()
  ctrl = Controller(setup.model, setup.model_config,
                    jax.device_get(setup.learner.inference_params(state)), setup.learner_config,
                    setup.action_tokenizer, setup.text_tokenizer, setup.spec, setup.image_sizes)
  return ctrl, setup.model_config


def measure(ctrl: Controller, calls: int, seed: int = 0) -> dict[str, float]:
  rng = np.random.default_rng(seed)
  spec = ctrl.spec
  ctrl.reset_latency_stats()
  for i in range(calls):
    if i % 50 == 0:
      ctrl.reset("pick up the red ball and put it in the box")
    obs = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
           for c in spec.cameras}
    if spec.state_dim:
      obs["state"] = rng.standard_normal(spec.state_dim).astype(np.float32)
    ctrl.act(obs)
  return ctrl.latency_stats()


def main(argv):
  del argv
  lines = ["# Controller latency per act() on this machine", "",
           f"`{' '.join(sys.argv)}`", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, jax {jax.__version__} "
           f"on {jax.default_backend()}. {_CALLS.value} calls each after warm-up, batch 1.", "",
           "| robot config | learner | architecture | model | p50 ms | p99 ms | mean ms |",
           "|---|---|---|---|---|---|---|"]
  for path, variant, arch in CASES:
    ctrl, m = controller_for(path, variant, arch)
    s = measure(ctrl, _CALLS.value)
    size = f"width {m.width}, depth {m.depth}, window {m.window}, {m.num_action_dims} dims"
    lines.append(f"| {path} | {variant} | {arch} | {size} | {s['p50_ms']:.2f} | "
                 f"{s['p99_ms']:.2f} | {s['mean_ms']:.2f} |")
    print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  report.emit(text, _OUT.value)


if __name__ == "__main__":
  app.run(main)
