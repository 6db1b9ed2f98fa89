"""Training batches sampled from a replay server (config data.source = "reverb").

Each example is sampled from the table (its sampler decides which), mixed with
data.dir's own examples when data.reverb.weight < 1 (offline-to-online), and
batched exactly as the tf.data pipeline batches; the learner sees the same
batch layout either way. A sample that waits longer than data.reverb.timeout_s
(an empty table, a rate limiter holding it, a server that went away) stops
training with an error naming the server and the table.

Resumption: a replay table changes while it is sampled, so there is no
position to return to; a checkpoint records that the batches came from replay,
and a resumed run samples afresh.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Optional, Sequence

import tensorflow as tf
from absl import logging

from qsft_vla.data import pipeline
from qsft_vla.data.batch_iterator import BatchIterator
from qsft_vla.errors import TrainingError
from qsft_vla.replay import table as table_lib

STATE_FILE = "replay_source.json"


def replay_examples(cfg, batch_size: int) -> tf.data.Dataset:
  """The table's items as examples (data.examples.example_spec)."""
  import reverb  # pylint: disable=g-import-not-at-top
  r = cfg.data.reverb
  ds = reverb.TrajectoryDataset.from_table_signature(
      server_address=r.server, table=cfg.replay.table,
      max_in_flight_samples_per_worker=2 * batch_size,
      rate_limiter_timeout_ms=int(r.timeout_s * 1000))
  return ds.map(lambda sample: sample.data)


def make_dataset(cfg, spec, tokenizer, *, batch_size: int, seed: int,
                 keep_returns: Optional[Sequence[float]] = None, stats=None) -> tf.data.Dataset:
  ds = replay_examples(cfg, batch_size)
  want = table_lib.signature(cfg)
  tf.nest.assert_same_structure(ds.element_spec, want)
  if keep_returns is not None:  # filtered BC: the first member's threshold
    ds = ds.filter(pipeline._keep_episode(keep_returns[0]))  # pylint: disable=protected-access
  weight = float(cfg.data.reverb.weight)
  if weight < 1.0:
    offline = pipeline.make_dataset(cfg.data, spec, tokenizer, gamma=cfg.learner.gamma,
                                    batch_size=None, seed=seed, train=True, validate=True,
                                    keep_returns=keep_returns, stats=stats)
    ds = tf.data.Dataset.sample_from_datasets([ds, offline], weights=[weight, 1.0 - weight],
                                              seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(2)


class ReplayBatchIterator(BatchIterator):
  """Batches from replay as numpy dicts.

  Reverb's client does not reconnect a stream to a server that went away and
  came back (restarted from its checkpoint, say): the stream blocks. So batches
  are fetched on a worker thread, and a stream that yields nothing for a
  quarter of data.reverb.timeout_s (at most 30 s), or fails, is replaced by a
  fresh one, with exponential backoff and each retry logged, until
  data.reverb.timeout_s has passed without a batch; then, as for an empty or
  rate-limited table, training stops with an error naming the server and the
  table. (A replaced stream's thread stays blocked in Reverb; it is a daemon.)"""

  def __init__(self, dataset: tf.data.Dataset, server: str, table: str, timeout_s: float,
               data_dirs=()):
    super().__init__(dataset, data_dirs)  # opens the first stream, self._it
    self.server, self.table, self.timeout_s = server, table, timeout_s
    self.stall_s = min(timeout_s / 4, 30.0)
    self._fetch(self._it)

  def _fetch(self, it) -> None:
    """A worker thread moving `it`'s batches into a fresh queue. It holds its own
    stream, so a replaced one never feeds, or reads, its successor."""
    self._queue = q = queue.Queue(maxsize=2)

    def fetch():
      while True:
        try:
          q.put(("batch", self.next_from(it)))
        except Exception as e:  # pylint: disable=broad-except
          q.put(("error", e))   # the consumer decides; this stream is done
          return
        if q is not self._queue:  # replaced while it was blocked: stop
          return

    threading.Thread(target=fetch, daemon=True, name="replay-stream").start()

  def __next__(self):
    start, delay = time.monotonic(), 0.5
    while True:
      try:
        kind, value = self._queue.get(timeout=self.stall_s)
        if kind == "batch":
          return value
        why = type(value).__name__
      except queue.Empty:
        why = f"nothing for {self.stall_s:g} s"
      waited = time.monotonic() - start
      if waited + delay > self.timeout_s:
        raise TrainingError(
            f"no batch from replay table {self.table!r} at {self.server} within "
            f"{self.timeout_s:g} s (data.reverb.timeout_s): the table is empty or held by "
            f"its rate limiter, or the server is down ({why})")
      logging.warning("replay: no batch from %s (%s); retrying in %.1f s (%.0f of %g s "
                      "waited)", self.server, why, delay, waited, self.timeout_s)
      time.sleep(delay)
      delay = min(2 * delay, 30.0)
      self._it = iter(self.dataset)  # a fresh connection
      self._fetch(self._it)

  def save_iterator_state(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".{STATE_FILE}.tmp")
    with open(tmp, "w") as f:
      json.dump({"source": "reverb", "server": self.server, "table": self.table}, f)
    os.replace(tmp, os.path.join(path, STATE_FILE))

  def restore_iterator_state(self, path: str) -> None:
    del path  # nothing to return to: a resumed run samples afresh


def as_numpy_batches(cfg, spec, tokenizer, *, batch_size: int, seed: int,
                     keep_returns=None, stats=None) -> ReplayBatchIterator:
  ds = make_dataset(cfg, spec, tokenizer, batch_size=batch_size, seed=seed,
                    keep_returns=keep_returns, stats=stats)
  r = cfg.data.reverb
  return ReplayBatchIterator(ds, r.server, cfg.replay.table, r.timeout_s,
                             pipeline._data_dirs(cfg.data)[0])  # pylint: disable=protected-access
