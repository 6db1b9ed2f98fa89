"""The input pipeline's position as an orbax checkpoint item.

Saved inside the step directory that orbax finalises atomically, next to the
params, so a checkpoint's parameters and data position always belong together.
The state is a tf.train.Checkpoint of the tf.data iterator (shuffle buffer and
prefetched batches included): resuming yields exactly the batches an
uninterrupted run would have seen next.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp

ITEM = "data_iterator"


def _own(directory) -> str:
  """Several processes each have their own stream: process i keeps its position in
  process_<i>/ (one process: the item directory itself, as always)."""
  import jax  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  if jax.process_count() == 1:
    return directory
  own = os.path.join(directory, f"process_{jax.process_index()}")
  os.makedirs(own, exist_ok=True)
  return own


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a pipeline.BatchIterator through its own state files."""

  def save(self, directory, args: "DataIteratorSave") -> None:
    args.iterator.save_iterator_state(_own(directory))

  def restore(self, directory, args: "DataIteratorRestore") -> Any:
    args.iterator.restore_iterator_state(_own(directory))
    return args.iterator

  def metadata(self, directory) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any  # restored in place and returned
