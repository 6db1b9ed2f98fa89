"""Bad data found inside the tf.data graph, reported as a DataError.

The episode and step functions run as TF graphs and cannot raise Python
exceptions; their checks fail (tf.debugging.Assert) with a message that
`fail` marks with where, step, key and what. When a batch is read, TF raises
an InvalidArgumentError carrying it, and `as_data_error` turns that back into
the DataError naming the dataset, episode, step and key.
"""

from __future__ import annotations

import re

import tensorflow as tf

from qsft_vla.errors import DataError

ERROR_MARK = "QSFT_DATA_ERROR"
_ERROR_RE = re.compile(ERROR_MARK + r"<<(.*)\|(-?\d*)\|([^|]*)\|([^|]*)>>", re.S)


def fail(where, key: str, what: str, step=None) -> tf.Tensor:
  """The marked message of a failed in-graph check (a string tensor)."""
  step = "" if step is None else tf.strings.as_string(step)
  return tf.strings.join([ERROR_MARK, "<<", where, "|", step, "|", key, "|", what, ">>"])


def as_data_error(e: tf.errors.OpError) -> Exception:
  """The DataError a marked TF error carries; `e` itself if it carries none."""
  m = _ERROR_RE.search(e.message or "")
  if m is None:
    return e
  where, step, key, what = m.groups()
  return DataError(where, what, step=int(step) if step else None, key=key)
