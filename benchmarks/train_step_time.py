"""Q-SFT vs BC: time per training step, measured side by side in one process.

  .venv/bin/python benchmarks/train_step_time.py [--config=robot_configs/babyai.py[:variant]] \
      [--override=model.vlm.compute_dtype=bfloat16 ...] [--batch_size=N] [--nopretrained] \
      [--rounds=15] [--steps_per_round=5] [--out=benchmarks/results/train_step_time.md]

Builds both learners from the same config (the model and batch of the config,
e.g. the backbone variant vlm_smollm2; only learner.algorithm differs: qsft
and bc), feeds them the same synthetic batch (random
pixels and tokens: the step's cost does not depend on the values), and
alternates: one round is `steps_per_round` Q-SFT steps then as many BC steps,
so both see the same machine load. Reports the median time per step of each,
the ratio of the medians and the median of the per-round ratios. The input
pipeline is not included (tests and benchmarks/pipeline_throughput.py cover it).
A learner may carry modifier variants: --algorithms=qsft,bc,qsft+lora,bc+lora
times full fine-tuning and LoRA side by side (a pretrained backbone variant in
--config), each Q-SFT against the BC with the same modifiers, or plain BC where
that is not timed (--algorithms=qsft,qsft+shared_encoder,bc: the architecture is
Q-SFT's alone; --algorithms=qsft,qsft+chunks,bc: batches of consecutive steps).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import train  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "robot_configs/babyai.py",
                              "robot config file[:variant]; the algorithm part is replaced")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "config field=value, e.g. "
                                      "model.vlm.compute_dtype=bfloat16")
_PRETRAINED = flags.DEFINE_bool("pretrained", True, "load pretrained weights where the config "
                                "does (off: random init; the step time does not depend on it)")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "alternating measurement rounds")
_STEPS = flags.DEFINE_integer("steps_per_round", 5, "steps of each learner per round")
_BATCH = flags.DEFINE_integer("batch_size", None, "default: the config's train.batch_size")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["qsft", "bc"], "learners to time, each an "
                                "algorithm with optional modifiers (qsft+lora); a ratio needs "
                                "qsft and bc with the same modifiers")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")


def _config(learner: str):
  """The config with learner "<algorithm>[+modifier...]" (e.g. "qsft+lora")."""
  return report.load_learner_config(_CONFIG.value, learner, _OVERRIDE.value)


def _learner(algorithm: str, batch_size: int):
  cfg = _config(algorithm)
  cfg.train.batch_size = batch_size
  cfg.data.dir = cfg.data.dir or "unused"
  # Bounds from the config are enough for shapes; no dataset is read.
  setup = train.build(cfg, stats=[None])
  t0 = time.perf_counter()
  state = setup.init_state(pretrained=_PRETRAINED.value)
  jax.block_until_ready(state)
  print(f"{algorithm}: initial state in {time.perf_counter() - t0:.1f} s", flush=True)
  batch = report.synthetic_batch(setup, batch_size)
  t0 = time.perf_counter()
  state, metrics = setup.learner.step(state, batch)
  jax.block_until_ready(metrics)
  print(f"{algorithm}: first step (compile) in {time.perf_counter() - t0:.1f} s", flush=True)
  return setup, state, batch, time.perf_counter() - t0


def _time(setup, state, batch, n):
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, metrics = setup.learner.step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return state, times


def _what_a_qsft_step_does(name: str, lcfg, action_dims: int) -> str:
  """One sentence on the passes a Q-SFT step of this learner config runs."""
  trained = {"shared": "one trunk with two heads",
             "shared_encoder": "two transformers on one observation encoder (which runs "
                               "once)",
             "pi_head": "one network (p_theta's) and a second head on its features (pi_phi's, "
                        "behind a stop-gradient)",
             "separate": "two networks"}[lcfg.architecture]
  if not lcfg.bootstraps:
    extra = "no extra forward pass (the Monte-Carlo target, mc_mix=1, needs no bootstrap)"
  elif lcfg.chunk_length > 1:
    n = lcfg.chunk_length
    pi = ("" if lcfg.backup == "mean" and lcfg.p_parametrization != "residual" else
          f"pi_phi at s' read from its own pass at s, plus one state per {n} rows; ")
    target = ("the Polyak target at s'" if action_dims == 1 else
              f"one pass of the Polyak target over s and one s' per {n} rows")
    extra = f"chunks of {n} consecutive steps: {pi}{target}, for the Bellman weights"
  else:
    target = "s'" if action_dims == 1 else "s and s'"
    pi = "" if lcfg.backup == "mean" and lcfg.p_parametrization != "residual" else "pi_phi at s' and "
    extra = f"extra forward passes of {pi}the Polyak target at {target} for the Bellman weights"
  return f"A {name} step trains {trained} with {extra}; BC trains one network."


def main(argv):
  del argv
  cfg = _config("qsft")
  batch_size = _BATCH.value or cfg.train.batch_size
  runs = {v: list(_learner(v, batch_size)) for v in _ALGORITHMS.value}
  times = {v: [] for v in runs}
  # Q-SFT / BC pairs with the same modifiers ({"": ("qsft", "bc"), "+lora": (...)}),
  # or plain BC where BC with them is not timed.
  pairs = {v[4:]: (v, "bc" + v[4:] if "bc" + v[4:] in runs else "bc")
           for v in runs if v.startswith("qsft") and ("bc" + v[4:] in runs or "bc" in runs)}
  round_ratios = {k: [] for k in pairs}
  for _ in range(_ROUNDS.value):
    per_round = {}
    for v, r in runs.items():
      r[1], t = _time(r[0], r[1], r[2], _STEPS.value)
      times[v].extend(t)
      per_round[v] = np.median(t)
    for k, (a, b) in pairs.items():
      round_ratios[k].append(per_round[a] / per_round[b])
  med = {v: float(np.median(t)) * 1e3 for v, t in times.items()}
  q = {v: (float(np.percentile(t, 10)) * 1e3, float(np.percentile(t, 90)) * 1e3)
       for v, t in times.items()}
  m = next(iter(runs.values()))[0].policy.model_config
  lines = [
      f"# Training step time: Q-SFT vs BC ({_CONFIG.value})",
      "",
      f"`{' '.join(sys.argv)}`",
      "",
      f"Machine: {report.machine()}. Batch {batch_size}; model "
      f"{report.model_summary(cfg.model.name, m)}; {_ROUNDS.value} alternating rounds of "
      f"{_STEPS.value} steps each.",
      "",
      "| learner | median ms/step | p10–p90 ms | first call (compile) s |",
      "|---|---|---|---|",
  ]
  for v in runs:
    lines.append(f"| {v} | {med[v]:.1f} | {q[v][0]:.1f}–{q[v][1]:.1f} | {runs[v][3]:.1f} |")
  lines.append("")
  for k, (a, b) in pairs.items():
    lines += [f"{a} / {b}: {med[a] / med[b]:.2f}x (ratio of medians); median of "
              f"per-round ratios {float(np.median(round_ratios[k])):.2f}x.", ""]
  for v in runs:
    if v.startswith("qsft"):
      lines += [_what_a_qsft_step_does(v, train.learner_config(_config(v)), m.num_action_dims),
                ""]
  text = "\n".join(lines)
  report.emit(text, _OUT.value)


if __name__ == "__main__":
  app.run(main)
