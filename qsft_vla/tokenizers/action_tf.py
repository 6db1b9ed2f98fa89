"""The TF twin of ActionTokenizer.encode, for the tf.data input pipeline.

Kept apart from action.py so that the tokenizers stay importable without
TensorFlow on the robot host; only the data pipeline imports this module.
The test in tests/test_pipeline.py checks it against the numpy encoder token for token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from qsft_vla.tokenizers.action import DISCRETE_TOLERANCE


def tf_action_encoder(tokenizer_spec: dict[str, Any]):
  """Returns (encode, out_of_bounds): TF twins of ActionTokenizer.encode.

  Built from `tokenizer.to_spec()` with the tokenizer's own float32 rule:
  token = number of the dimension's float32 bin edges <= x, after clipping x
  to the float32 bounds. `out_of_bounds(x)` is the "reject" test (bool[..., D]).
  """
  dims = tokenizer_spec["dims"]
  vocab = max(d["bins"] for d in dims)
  edges = np.full((len(dims), vocab - 1), np.inf, np.float32)
  lo, hi, oob_lo, oob_hi = (np.zeros(len(dims), np.float32) for _ in range(4))
  for i, d in enumerate(dims):
    if d["kind"] == "continuous":
      width = (d["high"] - d["low"]) / d["bins"]
      inner = d["low"] + width * np.arange(1, d["bins"])
      lo[i], hi[i] = d["low"], d["high"]
      oob_lo[i], oob_hi[i] = lo[i], hi[i]
    else:
      v = np.asarray(d["values"], np.float64)
      inner = (v[:-1] + v[1:]) / 2
      lo[i], hi[i] = v[0], v[-1]
      tol = DISCRETE_TOLERANCE * max(1.0, abs(v[0]), abs(v[-1]))
      oob_lo[i], oob_hi[i] = v[0] - tol, v[-1] + tol
    edges[i, :d["bins"] - 1] = inner
  tiny = np.finfo(np.float32).tiny

  def flush(x):  # subnormals -> 0, as the tokenizer does
    return tf.where(tf.abs(x) < tiny, tf.zeros_like(x), x)

  edges_t, lo_t, hi_t = flush(tf.constant(edges)), flush(tf.constant(lo)), flush(tf.constant(hi))

  def encode(actions):
    x = flush(tf.cast(actions, tf.float32))
    x = tf.clip_by_value(x, lo_t, hi_t)
    x = tf.where(tf.math.is_nan(x), lo_t + tf.zeros_like(x), x)
    return tf.reduce_sum(tf.cast(edges_t <= x[..., None], tf.int32), axis=-1)

  def out_of_bounds(actions):
    x = flush(tf.cast(actions, tf.float32))
    return (x < flush(tf.constant(oob_lo))) | (x > flush(tf.constant(oob_hi)))

  return encode, out_of_bounds
