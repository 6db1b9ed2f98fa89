"""Streams RLDS datasets into a replay server's table, one item per training example.

  python -m qsft_vla.replay.insert --config=robot_configs/babyai.py \
      --data=DIR[,DIR2] --server=localhost:8000

The examples are the tf.data pipeline's own (data.pipeline.make_dataset, one
ordered pass, no shuffle or augmentation): the same windows, next observations,
rescaled rewards, returns-to-go and action tokens as offline training reads, so
sampling the table is training on the same data. The action tokenizer and the
reward rescaling come from the statistics of the first dataset, as in training.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterator, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from qsft_vla import config as qconfig
from qsft_vla.data.episode import DataError


def examples(cfg, data_dirs: Sequence[str], stats: dict[str, Any] | None = None
             ) -> Iterator[dict[str, Any]]:
  """The pipeline's examples of `data_dirs` (members in order), as numpy.

  stats: the statistics to tokenize actions and rescale rewards by, for every
  member (default: each dataset's own, the tokenizer from the first). The actor
  passes its training run's, so online episodes are encoded as training encodes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from qsft_vla.data import pipeline, statistics  # pylint: disable=g-import-not-at-top
  from qsft_vla.robot import RobotSpec  # pylint: disable=g-import-not-at-top
  from qsft_vla.tokenizers.action import ActionTokenizer  # pylint: disable=g-import-not-at-top
  spec = RobotSpec.from_config(cfg.robot)
  data = cfg.data.copy_and_resolve_references()  # the caller's config stays as it is
  with data.unlocked():
    data.dir = data_dirs[0] if len(data_dirs) == 1 else list(data_dirs)
    data.weights = None if len(data_dirs) == 1 else [1.0] * len(data_dirs)
  if stats is not None:
    with data.unlocked():
      data.split = "train"  # a chunk of online episodes is read whole
    stats = [stats] * len(data_dirs)
  else:
    stats = [statistics.load_or_compute(d, spec, data.split) for d in data_dirs]
  tokenizer = ActionTokenizer.from_robot(spec, stats[0])
  it = pipeline.as_numpy_batches(data, spec, tokenizer, gamma=cfg.learner.gamma, batch_size=1,
                                 seed=cfg.seed, train=False, validate=True, stats=stats)
  for batch in it:
    yield tf.nest.map_structure(lambda x: x[0], batch)


def insert(cfg, data_dirs: Sequence[str], server: str, log_every: int = 1000,
           timeout: float = 30.0, timing: dict | None = None,
           stats: dict[str, Any] | None = None) -> int:
  """Inserts every example of `data_dirs` into cfg.replay.table at `server`
  (priority 1); returns how many. Refuses a table whose signature is not this
  config's example, naming the first key that differs, and a server that does
  not answer within `timeout` seconds. `timing`, if given, receives "stream_s":
  the seconds from the first example to the last flush (set-up excluded).
  stats: as in `examples`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from qsft_vla.data import rlds_reader  # pylint: disable=g-import-not-at-top
  qconfig.validate(cfg, where="config")
  for d in data_dirs:  # before the server is asked anything
    rlds_reader.open_builder(d)
  client = open_table(cfg, server, timeout)
  name = cfg.replay.table
  count, start = 0, time.time()
  with client.trajectory_writer(num_keep_alive_refs=1) as writer:
    first = None
    for ex in examples(cfg, data_dirs, stats):
      first = first or time.time()
      writer.append(ex)
      writer.create_item(name, 1.0, tf.nest.map_structure(lambda r: r[-1], writer.history))
      count += 1
      if bool(ex["has_next"]) is False:
        writer.end_episode()
      if log_every and count % log_every == 0:
        logging.info("inserted %d examples (%.0f/s)", count, count / (time.time() - start))
    writer.flush()
  if timing is not None:
    timing["stream_s"] = time.time() - (first or time.time())
  logging.info("inserted %d examples into %s/%s in %.1f s", count, server, name,
               time.time() - start)
  return count


def open_table(cfg, server: str, timeout: float = 30.0):
  """A Reverb client of `server` once it has answered and its cfg.replay.table has
  this config's example signature; a clear error naming the server otherwise."""
  import reverb  # pylint: disable=g-import-not-at-top
  from qsft_vla.replay import table as table_lib  # pylint: disable=g-import-not-at-top
  client = reverb.Client(server)
  name = cfg.replay.table
  try:
    info = client.server_info(timeout=max(1, int(round(timeout))))
  except (RuntimeError, reverb.errors.DeadlineExceededError) as e:
    raise ConnectionError(f"--server={server}: no replay server answered within {timeout:g} s "
                          f"({e})") from None
  if name not in info:
    raise ValueError(f"{server} has no table {name!r} (it has {sorted(info)})")
  _check_signature(info[name].signature, table_lib.signature(cfg), server, name)
  return client


def _check_signature(have, want, server: str, name: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if have is None:
    raise ValueError(f"{server}/{name}: the table has no signature; start it with "
                     "qsft_vla.replay.server")
  flat_have = dict(_flatten(have))
  flat_want = dict(_flatten(want))
  for key in sorted(set(flat_have) | set(flat_want)):
    a, b = flat_have.get(key), flat_want.get(key)
    if a is None or b is None or tf.TensorShape(a.shape) != tf.TensorShape(b.shape) \
        or a.dtype != b.dtype:
      raise ValueError(f"{server}/{name}: the table's {key} is "
                       f"{_describe(a)} but this config's examples have {_describe(b)} "
                       "(another robot config, data.window or data.image_size)")


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}{k}/")
  else:
    yield prefix.rstrip("/"), tree


def _describe(s) -> str:
  return "absent" if s is None else f"{s.dtype.name}{list(s.shape)}"


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "robot config file, "
                                  "robot_configs/<robot>.py[:variant]", lock_config=True)
  flags.DEFINE_list("data", None, "RLDS dataset folder(s)")
  flags.DEFINE_string("server", None, "replay server address, HOST:PORT")
  flags.DEFINE_float("timeout", 30.0, "seconds to wait for the server to answer")
  flags.mark_flags_as_required(["config", "data", "server"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    insert(f.config, f.data, f.server, timeout=f.timeout)
  except (qconfig.ConfigError, DataError, OSError, ValueError) as e:
    print(f"replay.insert: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  qconfig.exit_on_bad_config_args("replay.insert", sys.argv[1:])
  app.run(main)
