"""Replay throughput beside the tf.data pipeline and the learner, in one run.

  .venv/bin/python benchmarks/replay_throughput.py --data=data/babyai_gotolocal_mix \
      --out=benchmarks/results/replay_throughput.md

On one machine (the server in this process, as on a learner host):
- insert: examples/s of qsft_vla.replay.insert streaming --data into a table;
- sample: examples/s of the training source (qsft_vla.replay.source) at --batch_size;
- the tf.data pipeline's examples/s at the same batch (data.source=rlds);
- the learner's consumption: examples/s of the config's training step.
Each rate is the median of --windows timed windows after a warm-up.
"""

from __future__ import annotations

import os
import statistics as pystats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py, beside this script)

_CONFIG = flags.DEFINE_string("config", "robot_configs/babyai.py", "robot config[:variant]")
_DATA = flags.DEFINE_string("data", None, "RLDS dataset to insert and read", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 128, "examples per batch")
_WINDOWS = flags.DEFINE_integer("windows", 5, "timed windows (median reported)")
_BATCHES = flags.DEFINE_integer("batches", 10, "batches per timed window")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")


def _rate(next_batch, batch_size: int, warmup: int = 3) -> tuple[float, float, float]:
  for _ in range(warmup):
    next_batch()
  rates = []
  for _ in range(_WINDOWS.value):
    t0 = time.perf_counter()
    for _ in range(_BATCHES.value):
      next_batch()
    rates.append(_BATCHES.value * batch_size / (time.perf_counter() - t0))
  return pystats.median(rates), min(rates), max(rates)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from qsft_vla import train  # pylint: disable=g-import-not-at-top
  from qsft_vla.data import pipeline  # pylint: disable=g-import-not-at-top
  from qsft_vla.replay import insert as insert_lib  # pylint: disable=g-import-not-at-top
  from qsft_vla.replay import source  # pylint: disable=g-import-not-at-top
  from qsft_vla.replay.server import ReplayServer  # pylint: disable=g-import-not-at-top

  cfg = report.load_config(_CONFIG.value, [f"data.dir={_DATA.value}",
                                           f"train.batch_size={_BATCH.value}"])
  b = _BATCH.value
  rows = []
  with ReplayServer(cfg) as server:
    timing = {}
    n = insert_lib.insert(cfg, [_DATA.value], server.address, log_every=0, timing=timing)
    rows.append(("insert (qsft_vla.replay.insert, one writer)",
                 f"{n / timing['stream_s']:.0f}", "-",
                 f"{n} examples once, from the first example to the last flush"))
    setup = train.build(cfg)
    policy = setup.policy
    with cfg.unlocked():
      cfg.data.source = "reverb"
      cfg.data.reverb.server = server.address
    it = source.as_numpy_batches(cfg, policy.robot, policy.action_tokenizer, batch_size=b,
                                 seed=0, stats=setup.stats)
    med, lo, hi = _rate(lambda: next(it), b)
    rows.append((f"sample (data.source=reverb), batch {b}", f"{med:.0f}", f"{lo:.0f}–{hi:.0f}",
                 ""))
  rlds = pipeline.as_numpy_batches(cfg.data, policy.robot, policy.action_tokenizer,
                                   gamma=policy.learner.gamma, batch_size=b, seed=0,
                                   validate=False, stats=setup.stats)
  med, lo, hi = _rate(lambda: next(rlds), b)
  rows.append((f"tf.data pipeline (data.source=rlds), batch {b}", f"{med:.0f}",
               f"{lo:.0f}–{hi:.0f}", ""))
  state = setup.init_state(pretrained=False)
  batch = next(rlds)
  from qsft_vla.training import batches as batches_lib  # pylint: disable=g-import-not-at-top
  prepared = batches_lib.BatchPreparer(policy.text_tokenizer,
                                       policy.model_config.max_text_len)(batch)
  holder = {"state": state}

  def step():
    holder["state"], m = setup.learner.step(holder["state"], prepared)
    jax.block_until_ready(m)

  med, lo, hi = _rate(step, b, warmup=2)
  rows.append((f"learner step ({cfg.learner.algorithm}, {cfg.learner.architecture}), batch {b}",
               f"{med:.0f}", f"{lo:.0f}–{hi:.0f}", "consumption"))

  lines = ["# Replay throughput vs the tf.data pipeline and the learner", "",
           f"`{' '.join(sys.argv)}`", "",
           f"Machine: {report.machine()}. Config {_CONFIG.value}; dataset {_DATA.value}. The "
           "server runs in this process; rates are examples/s, the median of "
           f"{_WINDOWS.value} windows of {_BATCHES.value} batches after a warm-up.", "",
           "| path | examples/s | min–max | note |", "|---|---|---|---|"]
  lines += [f"| {a} | {r} | {m} | {n} |" for a, r, m, n in rows]
  lines.append("")
  report.emit("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  app.run(main)
