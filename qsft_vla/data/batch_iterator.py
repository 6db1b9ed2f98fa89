"""A pipeline's batches as numpy arrays, with a saveable position.

BatchIterator turns the data errors found inside the graph back into DataError
(graph_errors) and names a damaged shard; its position (shuffle buffers and
prefetched batches included) is saved atomically under a folder: fresh
iterator-<uuid> files, then the pointer file swapped in.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterator

import tensorflow as tf

from qsft_vla.data import graph_errors, rlds_reader

ITERATOR_STATE_POINTER = "iterator_state.json"


class BatchIterator:
  """Iterates a pipeline's batches as dicts of numpy arrays (strings as bytes).

  Bad data found while reading raises DataError. The iterator position
  (shuffle buffers and prefetched batches included) can be saved and restored
  with a tf.train.Checkpoint of the underlying tf.data iterator.
  """

  def __init__(self, dataset: tf.data.Dataset, data_dirs: tuple[str, ...] = ()):
    self.dataset = dataset
    self.data_dirs = tuple(data_dirs)   # to name a damaged shard
    self._it = iter(dataset)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    return self.next_from(self._it)

  def next_from(self, it) -> dict[str, Any]:
    """The next batch of the tf.data iterator `it` as numpy, bad data as DataError."""
    try:
      batch = next(it)
    except tf.errors.InvalidArgumentError as e:
      raise graph_errors.as_data_error(e) from None
    except tf.errors.DataLossError as e:
      raise rlds_reader.damaged_shard_error(self.data_dirs, e) from None
    return tf.nest.map_structure(lambda x: x.numpy(), batch)

  def save_iterator_state(self, path: str) -> None:
    """Writes the position under directory `path`, atomically: the new files
    get a fresh prefix and the pointer file is swapped in (os.replace) only
    after they are complete; a failure leaves the previous state intact."""
    os.makedirs(path, exist_ok=True)
    prefix = f"iterator-{uuid.uuid4().hex}"
    try:
      tf.train.Checkpoint(iterator=self._it).write(os.path.join(path, prefix))
      pointer_tmp = os.path.join(path, f".{ITERATOR_STATE_POINTER}.{prefix}.tmp")
      with open(pointer_tmp, "w") as f:
        json.dump({"prefix": prefix}, f)
      os.replace(pointer_tmp, os.path.join(path, ITERATOR_STATE_POINTER))
    except BaseException:
      _remove_state_files(path, keep=_current_prefix(path))
      raise
    _remove_state_files(path, keep=prefix)

  def restore_iterator_state(self, path: str) -> None:
    """Restores a position saved by `save_iterator_state` into this iterator,
    which must come from an identically configured pipeline."""
    prefix = _current_prefix(path)
    if prefix is None:
      raise FileNotFoundError(f"{path}: no iterator state ({ITERATOR_STATE_POINTER} missing)")
    tf.train.Checkpoint(iterator=self._it).read(os.path.join(path, prefix)).assert_consumed()


def _current_prefix(path: str) -> str | None:
  try:
    with open(os.path.join(path, ITERATOR_STATE_POINTER)) as f:
      return json.load(f)["prefix"]
  except FileNotFoundError:
    return None


def _remove_state_files(path: str, keep: str | None) -> None:
  """Deletes iterator files and temp pointers other than `keep`'s."""
  for name in os.listdir(path):
    stale = name.startswith("iterator-") and (keep is None or not name.startswith(keep + "."))
    if stale or (name.startswith(f".{ITERATOR_STATE_POINTER}.") and name.endswith(".tmp")):
      os.remove(os.path.join(path, name))
