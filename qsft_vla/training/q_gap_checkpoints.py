"""The Q-gap diagnostic (q_gap.py) of a finished run's saved checkpoints.

  python -m qsft_vla.training.q_gap_checkpoints --workdir=RUN [--step=2000,4000] \
      [--split="train[90%:]"] [--data=DIR]

Prints one JSON line per checkpoint: the q_gap/* figures training logs with
eval.q_gap_split, computed with the run's own config (e.g. for a run trained
without the diagnostic, or to probe another slice or dataset).
"""

from __future__ import annotations

import json
from typing import Optional

import ml_collections
from absl import app, flags

from qsft_vla import train
from qsft_vla.policy import TrainedPolicy, checkpoints
from qsft_vla.training import batches, q_gap


def probe_checkpoint(workdir: str, split: str, steps=None, data_dir: Optional[str] = None,
                     max_examples: Optional[int] = None) -> dict[int, dict[str, float]]:
  """{step: q_gap/* scalars} of a run's saved checkpoints (`steps`, default the
  latest) on `split` of the run's first dataset (or `data_dir`), with the run's
  own config: the figures training logs with eval.q_gap_split=split."""
  ckpt_dir, latest = checkpoints.resolve(workdir)
  cfg = ml_collections.ConfigDict(checkpoints.read_meta(ckpt_dir, latest)["config"])
  if data_dir:
    cfg.data.dir, cfg.data.weights = data_dir, None
  cfg.eval.q_gap_split = split
  if max_examples:
    cfg.eval.q_gap_examples = int(max_examples)
  setup = train.build(cfg)
  prepare = batches.BatchPreparer(setup.policy.text_tokenizer,
                                 setup.policy.model_config.max_text_len)
  probe = q_gap.maybe_probe(cfg, setup, prepare)
  if probe is None:
    raise ValueError(f"{setup.data_dirs[0]} ({split}): no episodes labelled "
                     f"{q_gap.EXPERT!r} to compare against")
  out = {}
  for step in (steps or [latest]):
    policy = TrainedPolicy.load(workdir, int(step))
    out[policy.step] = probe(policy.params)
  return out


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  for step, scalars in probe_checkpoint(f.workdir, f.split, [int(s) for s in f.step] or None,
                                        f.data or None, f.examples or None).items():
    print(json.dumps({"step": step, **{k: round(v, 4) for k, v in scalars.items()}}))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
  flags.DEFINE_list("step", [], "Checkpoint steps (default: the latest).")
  flags.DEFINE_string("split", "train[90%:]", "The slice of the run's first dataset; "
                      "held out of training if the run's data.split left it out.")
  flags.DEFINE_string("data", "", "Another dataset to probe on (default: the run's).")
  flags.DEFINE_integer("examples", 0, "Steps to read (default: the run's eval.q_gap_examples).")
  app.run(main)
