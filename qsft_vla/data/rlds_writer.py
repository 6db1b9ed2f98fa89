"""Writes episodes as an RLDS dataset with TFDS, atomically.

The dataset is a TFDS directory (dataset_info.json, features.json, TFRecord
shards) readable with `tfds.builder_from_directory(out)`. It is written under a
temporary name beside `out` and renamed only when complete, so a failed or
killed run never leaves a half-written dataset under the final name.

Overwriting replaces only what is recognisably a dataset this module wrote
(its provenance file, TFDS files and statistics caches, nothing else) and
never a folder that holds the data being converted: anything else at `out`
is refused, naming it, before any work is done.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qsft_vla import paths
from qsft_vla.data.episode import METADATA_KEYS, DataError, check_episode, step_features
from qsft_vla.robot import RobotSpec

# Written beside the TFDS files: the robot the data was checked against and how
# it was made (generator flags, converter input), for provenance.
PROVENANCE_FILE = "qsft_provenance.json"
# What a dataset written here may hold: TFDS's files and shards, our provenance,
# the statistics caches (data/statistics.py) and their lock files.
_OWN_FILES = ("dataset_info.json", "features.json", PROVENANCE_FILE, "*.tfrecord-*",
              "qsft_stats.json*")


def _tmp_prefix(out: str) -> str:
  return f".{os.path.basename(out)}.tmp-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


def remove_stale_temporaries(out: str) -> list[str]:
  """Deletes the temporary folders that killed writers of `out` left beside it
  (`.<name>.tmp-<pid>-*` whose process is gone); a live writer's stays."""
  parent, prefix = os.path.dirname(os.path.abspath(out)), _tmp_prefix(out)
  removed = []
  for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
    pid = name[len(prefix):].split("-", 1)[0]
    if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      removed.append(name)
  return removed


def check_replaceable(out: str, protect=()) -> None:
  """Raises FileExistsError unless `out` may be replaced by a new dataset: an empty
  directory, or one holding only files this writer makes (with its provenance file), and
  neither equal to nor a parent of any path in `protect` (e.g. the input)."""
  out = os.path.realpath(out)
  for p in protect:
    p = os.path.realpath(p)
    if p == out or p.startswith(out.rstrip(os.sep) + os.sep):
      raise FileExistsError(f"--out {out} holds the input {p}; refusing to overwrite it "
                            "(choose another --out)")
  if not os.path.isdir(out) or os.path.islink(out):
    raise FileExistsError(f"--out {out} exists and is not a dataset directory; refusing to "
                          "overwrite it (choose another --out)")
  names = os.listdir(out)
  if not names:
    return  # an empty folder: nothing to lose
  foreign = sorted(n for n in names
                   if not any(fnmatch.fnmatch(n, pat) for pat in _OWN_FILES)
                   or not os.path.isfile(os.path.join(out, n)))
  if PROVENANCE_FILE not in names or foreign:
    why = (f"it holds {len(foreign)} file(s) a dataset of ours does not: "
           f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}" if foreign else
           f"it has no {PROVENANCE_FILE}, so this package did not write it")
    raise FileExistsError(f"--out {out} is not a dataset written by data_tools ({why}); "
                          "--overwrite replaces only those; choose another --out")


def episode_features(spec: RobotSpec, image_encoding: str = "png") -> tfds.features.FeaturesDict:
  """The TFDS features of our RLDS schema for this robot (episode.step_features,
  in the canonical layout; cameras stored as encoded images)."""
  step: dict[str, Any] = {"observation": {}}
  for name, (shape, dtype) in step_features(spec).items():
    if name.startswith("observation/") and dtype is np.uint8:
      feature = tfds.features.Image(shape=shape, dtype=dtype, encoding_format=image_encoding)
    elif dtype is np.object_:
      feature = tfds.features.Text()
    elif shape == ():
      feature = tfds.features.Scalar(dtype=dtype)
    else:
      feature = tfds.features.Tensor(shape=shape, dtype=dtype)
    if name.startswith("observation/"):
      step["observation"][name.split("/", 1)[1]] = feature
    else:
      step[name] = feature
  metadata = {
      "episode_id": tfds.features.Text(),
      "source": tfds.features.Text(),
      "noise": tfds.features.Scalar(dtype=np.float32),
      "behavior": tfds.features.Text(),
      "success": tfds.features.Scalar(dtype=np.bool_),
      "return": tfds.features.Scalar(dtype=np.float32),
  }
  return tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset(step),
      "episode_metadata": metadata,
  })


class RLDSWriter:
  """Context manager: `with RLDSWriter(out, spec, name=...) as w: w.add(episode)`.

  Every episode is checked with `check_episode` before it is written; the first
  bad one aborts the whole dataset (nothing appears at `out`).
  """

  def __init__(self, out: str, spec: RobotSpec, *, name: str, description: str = "",
               provenance: dict[str, Any] | None = None, split: str = "train",
               episodes_per_shard: int = 100, image_encoding: str = "png",
               overwrite: bool = False, protect=()):
    if not (isinstance(episodes_per_shard, int) and episodes_per_shard >= 1):
      raise ValueError(f"episodes_per_shard must be an integer >= 1, got {episodes_per_shard!r}")
    self.out = os.path.abspath(out)
    self.protect = tuple(protect)   # paths that must survive an overwrite (the input)
    self.spec = spec
    self.name = name
    self.description = description
    self.provenance = dict(provenance or {})
    self.split = split
    self.episodes_per_shard = episodes_per_shard
    self.image_encoding = image_encoding
    self.overwrite = overwrite
    self.num_episodes = 0
    self.num_steps = 0
    self._tmp = None
    self._writer = None

  def __enter__(self) -> "RLDSWriter":
    if os.path.lexists(self.out):
      if not self.overwrite:
        raise FileExistsError(f"{self.out} already exists; choose another --out or remove it")
      check_replaceable(self.out, self.protect)
    parent = os.path.dirname(self.out)
    try:
      paths.check_writable_folder(parent)
    except OSError as e:
      raise type(e)(f"--out {self.out}: {e}") from None
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(self.out)
    self._tmp = tempfile.mkdtemp(prefix=f"{_tmp_prefix(self.out)}{os.getpid()}-", dir=parent)
    info = tfds.core.DatasetInfo(
        builder=tfds.core.dataset_info.DatasetIdentity(
            name=self.name, data_dir=self._tmp, module_name="", version="1.0.0"),
        description=self.description,
        features=episode_features(self.spec, self.image_encoding))
    self._writer = tfds.core.SequentialWriter(
        ds_info=info, max_examples_per_shard=self.episodes_per_shard)
    self._writer.initialize_splits([self.split])
    return self

  def add(self, episode: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Checks and appends one episode; returns check_episode's report."""
    where = where or f"episode {self.num_episodes}"
    report = check_episode(episode, self.spec, where)
    steps = episode["steps"]
    instr = [s.decode() if isinstance(s, bytes) else s for s in steps["language_instruction"]]
    example = {
        "steps": {
            "observation": {k: np.asarray(v) for k, v in steps["observation"].items()
                            if k in self.spec.camera_names or k == "state"},
            "action": np.asarray(steps["action"], np.float32),
            "reward": np.asarray(steps["reward"], np.float32),
            "discount": np.asarray(steps["discount"], np.float32),
            "is_first": np.asarray(steps["is_first"], np.bool_),
            "is_last": np.asarray(steps["is_last"], np.bool_),
            "is_terminal": np.asarray(steps["is_terminal"], np.bool_),
            "language_instruction": instr,
        },
        "episode_metadata": _metadata(episode.get("episode_metadata") or {}, steps, where,
                                      self.num_episodes),
    }
    # SequentialWriter wants the steps as a list of step dicts.
    n = report["length"]
    example["steps"] = [_index(example["steps"], t) for t in range(n)]
    self._tf_write(self._writer.add_examples, {self.split: [example]})
    self.num_episodes += 1
    self.num_steps += n
    return report

  def _tf_write(self, fn, arg) -> None:
    """TF reports a full disk or an I/O error as its own OpError: made an OSError (the
    binaries' "cannot write" class); __exit__ then removes the unfinished dataset."""
    try:
      fn(arg)
    except tf.errors.OpError as e:
      raise OSError(f"--out {self.out}: cannot write the dataset: {e.message}; nothing was "
                    "kept") from None

  def __exit__(self, exc_type, exc, tb):
    try:
      if exc_type is None:
        if self.num_episodes == 0:
          raise DataError(self.out, "no episodes were written")
        self._tf_write(self._writer.close_splits, [self.split])
        with open(os.path.join(self._tmp, PROVENANCE_FILE), "w") as f:
          json.dump({"name": self.name, "num_episodes": self.num_episodes,
                     "num_steps": self.num_steps, **self.spec.to_dict(),
                     "provenance": self.provenance}, f, indent=2)
        old = None
        if os.path.lexists(self.out):  # overwrite=True: replace only once complete
          check_replaceable(self.out, self.protect)  # again: it may have changed meanwhile
          old = self._tmp + ".old"
          os.rename(self.out, old)   # never a moment without a whole dataset or its backup
        os.rename(self._tmp, self.out)
        self._tmp = None
        if old is not None:
          shutil.rmtree(old, ignore_errors=True)
    finally:
      if self._tmp is not None:
        shutil.rmtree(self._tmp, ignore_errors=True)
    return False


def _metadata(md: dict[str, Any], steps, where: str, index: int) -> dict[str, Any]:
  """Fills what the producer did not say: return from rewards, success from is_terminal."""
  unknown = set(md) - set(METADATA_KEYS)
  if unknown:
    raise DataError(where, f"unknown episode_metadata field(s) {sorted(unknown)}",
                    key="episode_metadata")
  return {"episode_id": str(md.get("episode_id", index)),
          "source": str(md.get("source", "")),
          "noise": np.float32(md.get("noise", -1.0)),
          "behavior": str(md.get("behavior", "")),
          "success": np.bool_(md["success"] if "success" in md
                              else bool(np.asarray(steps["is_terminal"])[-1])),
          "return": np.float32(md["return"] if "return" in md else float(np.sum(steps["reward"])))}


def _index(tree, t):
  if isinstance(tree, dict):
    return {k: _index(v, t) for k, v in tree.items()}
  return tree[t]
