"""The replay table: its signature (one training example, data.examples.example_spec)
and its sampler, remover and rate limiter from the config's replay section."""

from __future__ import annotations

from typing import Any

import reverb

from qsft_vla.data import examples
from qsft_vla.robot import RobotSpec


def signature(cfg) -> dict[str, Any]:
  """tf.TensorSpecs of one item: the example the tf.data pipeline yields for this
  config's robot, history window and image size."""
  spec = RobotSpec.from_config(cfg.robot)
  size = None if cfg.data.image_size is None else tuple(cfg.data.image_size)
  return examples.example_spec(spec, window=int(cfg.data.window), image_size=size)


def rate_limiter(r) -> reverb.rate_limiters.RateLimiter:
  if r.rate_limiter == "min_size":
    return reverb.rate_limiters.MinSize(r.min_size_to_sample)
  return reverb.rate_limiters.SampleToInsertRatio(
      samples_per_insert=float(r.samples_per_insert),
      min_size_to_sample=int(r.min_size_to_sample), error_buffer=float(r.error_buffer))


def make_table(cfg) -> reverb.Table:
  r = cfg.replay
  sampler = (reverb.selectors.Uniform() if r.sampler == "uniform"
             else reverb.selectors.Prioritized(float(r.priority_exponent)))
  return reverb.Table(name=r.table, sampler=sampler, remover=reverb.selectors.Fifo(),
                      max_size=int(r.max_size), rate_limiter=rate_limiter(r),
                      signature=signature(cfg))
