"""Model FLOPs utilisation of a training step: FLOPs per step, tokens/s, MFU.

  .venv/bin/python benchmarks/mfu.py [--config=robot_configs/babyai.py:vlm_smollm2] \
      [--algorithm=qsft] [--batch_size=8] [--steps=5] [--peak_tflops=N] \
      [--override=model.vlm.compute_dtype=bfloat16 ...] [--out=benchmarks/results/mfu.md]

The FLOPs of one step are XLA's count for the compiled step (cost_analysis:
every dot and convolution of the forward and backward passes the step runs,
from their shapes; the elementwise work is counted too but is small), so
Q-SFT's two networks, and any forward pass its target needs, are all in it.
The step is timed on a synthetic batch (the values do not change the cost).
MFU = FLOPs per step / seconds per step / the device's peak FLOP/s: the peak is
--peak_tflops where given (an accelerator's datasheet figure for the compute
dtype), else measured here as the best rate of a large float32 matmul
(the machine's practical matmul peak; on a CPU that is what to compare with).
Tokens per example: the model's sequence (observation prefix + action tokens).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import train  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "robot_configs/babyai.py:vlm_smollm2",
                              "robot config file[:variant]")
_ALGORITHM = flags.DEFINE_string("algorithm", "qsft", "learner: algorithm[+modifiers]")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "config field=value")
_BATCH = flags.DEFINE_integer("batch_size", 8, "global batch of the step")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps after the compiling one")
_PEAK = flags.DEFINE_float("peak_tflops", None, "the device's peak TFLOP/s (default: measured "
                           "float32 matmul rate)")
_PRETRAINED = flags.DEFINE_bool("pretrained", False, "load pretrained weights (the cost does "
                                "not depend on them)")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of the fastest of `repeats` float32 [n, n] @ [n, n] products."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def step_flops(setup, state, batch) -> float:
  """XLA's FLOP count of the learner's compiled step on this batch."""
  cost = setup.learner.lower_step(state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def main(argv):
  del argv
  cfg = report.load_learner_config(_CONFIG.value, _ALGORITHM.value, _OVERRIDE.value)
  cfg.train.batch_size = _BATCH.value
  cfg.data.dir = cfg.data.dir or "unused"
  setup = train.build(cfg, stats=[None])
  state = setup.init_state(pretrained=_PRETRAINED.value)
  batch = report.synthetic_batch(setup, _BATCH.value)
  t0 = time.perf_counter()
  state, metrics = setup.learner.step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  flops = step_flops(setup, state, batch)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = setup.learner.step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  peak = _PEAK.value * 1e12 if _PEAK.value else matmul_peak()
  m = setup.policy.model_config
  tokens = _BATCH.value * m.seq_len
  lines = [
      f"# Model FLOPs utilisation of a training step ({_CONFIG.value}, {_ALGORITHM.value})", "",
      f"`{' '.join(sys.argv)}`", "",
      f"Machine: {report.machine()}. Model {report.model_summary(cfg.model.name, m)}; "
      f"batch {_BATCH.value}; {m.seq_len} tokens per example; median of {_STEPS.value} steps "
      f"after the compiling one ({compile_s:.0f} s).", "",
      "| FLOPs per step (XLA) | s per step | tokens/s | achieved TFLOP/s | peak TFLOP/s | MFU |",
      "|---|---|---|---|---|---|",
      f"| {flops:.3g} | {step_s:.3f} | {tokens / step_s:.0f} | {flops / step_s / 1e12:.3f} | "
      f"{peak / 1e12:.3f} ({'given' if _PEAK.value else 'measured f32 matmul'}) | "
      f"{100 * flops / step_s / peak:.1f}% |", ""]
  report.emit("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  app.run(main)
