"""Opens any RLDS dataset on disk and maps its steps to our canonical keys.

The robot config's `rlds_keys` says where each canonical key lives in the
dataset's steps ("observation/image", "observation/natural_language_instruction",
...), so real Open X-Embodiment datasets load with a mapping only. Used by the
validator, the statistics and the input pipeline.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qsft_vla.data.episode import DataError
from qsft_vla.robot import RobotSpec


def dataset_info_path(data_dir: str) -> str:
  """The dataset's dataset_info.json; a DataError if `data_dir` is not a dataset folder."""
  if not os.path.isdir(data_dir):
    raise DataError(data_dir, "dataset directory does not exist" if not os.path.exists(data_dir)
                    else "not a folder (a dataset is a TFDS dataset directory)")
  info = os.path.join(data_dir, "dataset_info.json")
  if not os.path.exists(info):
    raise DataError(data_dir, "not a TFDS dataset directory (no dataset_info.json); "
                    "make one with `python -m data_tools.convert` or `data_tools.generate`")
  return info


def open_builder(data_dir: str):
  """The TFDS builder of an RLDS dataset directory, with a clear error if it is not one."""
  info = dataset_info_path(data_dir)
  try:
    with open(info, encoding="utf-8") as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(info, f"unreadable ({type(e).__name__}: {e}); the dataset's description is "
                    "damaged: restore it or regenerate the dataset") from e
  features = os.path.join(data_dir, "features.json")
  if not os.path.exists(features):
    raise DataError(features, "missing: the dataset's feature description is gone; restore it "
                    "or regenerate the dataset")
  try:
    builder = tfds.builder_from_directory(data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS reads dataset_info.json and features.json here; a ParseError is the former.
    where = info if type(e).__name__ == "ParseError" else data_dir
    raise DataError(where, f"cannot open as a TFDS dataset: {type(e).__name__}: {e}") from e
  if "steps" not in builder.info.features:
    raise DataError(data_dir, "not an RLDS dataset: episodes have no 'steps'", key="steps")
  for name, split in builder.info.splits.items():
    for path in split.filepaths:  # before reading: TF would fail mid-read, naming nothing
      if not os.path.isfile(os.fspath(path)):
        raise DataError(os.fspath(path), f"missing record file of split {name!r} (listed in "
                        "dataset_info.json); restore it or regenerate the dataset")
  return builder


def damaged_shard_error(data_dirs, error: Exception) -> Exception:
  """A DataError naming the damaged record file of `data_dirs` that raised `error`
  (TF's DataLossError names only a byte offset). Each shard is read raw, without
  parsing: cheap next to the failure it explains. `error` itself if none fails."""
  if isinstance(data_dirs, str):
    data_dirs = [data_dirs]
  for data_dir in data_dirs:
    for path in sorted(glob.glob(os.path.join(data_dir, "*.tfrecord*"))):
      try:
        for _ in tf.data.TFRecordDataset(path):
          pass
      except tf.errors.OpError as e:
        found = re.search(r"corrupted record at \d+|truncated record at \d+", e.message or "")
        what = found.group(0) if found else type(e).__name__
        return DataError(path, f"damaged record file ({what}); restore it or regenerate the "
                         "dataset")
  return error


def _get(tree: dict[str, Any], path: str, where: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise DataError(where, f"key not found (at {part!r}; present: {have}); "
                      "fix robot.rlds_keys in the robot config", key=path)
    node = node[part]
  return node


ARGMAX = ":argmax"  # an action part that is a one-hot vector: its index is one dimension


def action_parts(spec: RobotSpec) -> list[tuple[str, bool]]:
  """[(path, argmax)] of rlds_keys.action: one path ("action", a float vector of the
  robot's action_dim), or several joined by "," that are concatenated in token order,
  each a scalar or vector feature (bool, int or float; cast to float32) or a one-hot
  vector read as its index ("action/terminate_episode:argmax"), as Open X-Embodiment
  datasets store their actions."""
  parts = []
  for part in str(spec.rlds_keys["action"]).split(","):
    part = part.strip()
    parts.append((part[:-len(ARGMAX)], True) if part.endswith(ARGMAX) else (part, False))
  return parts


def action_is_one_vector(spec: RobotSpec) -> bool:
  """Whether rlds_keys.action names one float vector feature (our own datasets' layout)."""
  parts = action_parts(spec)
  return len(parts) == 1 and not parts[0][1]


def canonical_step_keys(spec: RobotSpec) -> dict[str, str]:
  """Canonical flat name -> dataset path, e.g. {"observation/image": "observation/image"}.

  "action" maps to rlds_keys.action as written (see action_parts for several
  parts); "discount" is left out when rlds_keys.discount is "" (datasets without
  one, e.g. fractal20220817_data: read as 1)."""
  k = spec.rlds_keys
  out = {f"observation/{cam}": k["cameras"][cam] for cam in spec.camera_names}
  if spec.state_dim:
    out["observation/state"] = k["state"]
  for name in ("action", "reward", "discount", "is_first", "is_last", "is_terminal"):
    if name != "discount" or k[name]:
      out[name] = k[name]
  if spec.instruction_source == "step":
    out["language_instruction"] = k["language_instruction"]
  return out


def feature_paths(spec: RobotSpec) -> dict[str, str]:
  """Every dataset path the robot reads -> its canonical name (the action's parts
  each under "action")."""
  out = {}
  for name, path in canonical_step_keys(spec).items():
    if name == "action":
      out.update({p: name for p, _ in action_parts(spec)})
    else:
      out[path] = name
  return out


def canonicalize_steps(steps: dict[str, Any], spec: RobotSpec, where: str,
                       batched: bool = False) -> dict[str, Any]:
  """Maps a (tf or numpy) steps dict to the canonical nested layout.

  Works on tensors inside tf.data maps too: one step, or (batched) all steps of
  an episode with a leading T axis. A fixed instruction is filled in by the
  caller (it is not in the data).
  """
  out: dict[str, Any] = {"observation": {}}
  for name, path in canonical_step_keys(spec).items():
    if name == "action":
      out[name] = _action(steps, spec, where, batched)
    elif name.startswith("observation/"):
      out["observation"][name.split("/", 1)[1]] = _get(steps, path, where)
    else:
      out[name] = _get(steps, path, where)
  if "discount" not in out:
    out["discount"] = tf.ones_like(tf.cast(out["reward"], tf.float32))
  return out


def _action(steps, spec: RobotSpec, where: str, batched: bool):
  if action_is_one_vector(spec):
    return _get(steps, spec.rlds_keys["action"], where)  # as stored
  pieces = []
  for path, argmax in action_parts(spec):
    x = tf.convert_to_tensor(_get(steps, path, where))
    if argmax:
      x = tf.cast(tf.argmax(x, axis=-1), tf.float32)[..., None]
    else:
      x = tf.cast(x, tf.float32)
      if x.shape.rank == int(batched):  # a scalar feature: one dimension
        x = x[..., None]
    pieces.append(x)
  return tf.concat(pieces, axis=-1)


def check_action_features(builder, spec: RobotSpec, where: str) -> None:
  """The action's parts must be bool, int or float features whose widths add up to
  the robot's action dimensions (a one-hot part counts one)."""
  if action_is_one_vector(spec):
    return  # checked with the other features, as float32[action_dim]
  width = 0
  for path, argmax in action_parts(spec):
    f = step_feature(builder, path)
    dtype = tf.dtypes.as_dtype(getattr(f, "np_dtype", None) or f.dtype)
    shape = tuple(f.shape)
    if not (dtype.is_floating or dtype.is_integer or dtype.is_bool) or len(shape) > 1:
      raise DataError(where, f"action part declared {dtype.name}{list(shape)}: expected a "
                      "bool, int or float scalar or vector", key=path)
    if argmax and len(shape) != 1:
      raise DataError(where, f"action part {path}{ARGMAX} must be a one-hot vector, declared "
                      f"shape {list(shape)}", key=path)
    width += 1 if argmax or not shape else shape[0]
  if width != spec.action_dim:
    raise DataError(where, f"the action parts {spec.rlds_keys['action']!r} give {width} "
                    f"dimensions; robot {spec.name!r} has {spec.action_dim} "
                    f"({', '.join(d.name for d in spec.action_dims)})", key="action")


def step_feature(builder, path: str):
  """The TFDS feature declared for one step key ("observation/image") of a dataset."""
  feature = builder.info.features["steps"].feature
  for part in path.split("/"):
    feature = feature[part]
  return feature


def check_dataset_keys(builder, spec: RobotSpec, where: str) -> None:
  """Fails early, naming the key, if the dataset lacks a key the robot needs."""
  step_features = builder.info.features["steps"].feature
  flat = {}

  def walk(f, prefix):
    if isinstance(f, tfds.features.FeaturesDict):
      for k, v in f.items():
        walk(v, f"{prefix}{k}/")
    else:
      flat[prefix[:-1]] = f

  walk(step_features, "")
  for path, name in feature_paths(spec).items():
    if path not in flat:
      raise DataError(where, f"dataset steps have no {path!r} (needed for {name}); present: "
                      f"{sorted(flat)}; fix robot.rlds_keys", key=path)
  check_action_features(builder, spec, where)


def iterate_episodes(data_dir: str, spec: RobotSpec, split: str = "train"
                     ) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (index, canonical numpy episode) in file order; for tools, not training.

  Steps stream through one traced tf.data pipeline tagged with their episode
  index and are grouped here: batching a whole episode inside tf.data needs a
  batch size, and tf.data reserves memory for all of it.
  """
  builder = open_builder(data_dir)
  check_dataset_keys(builder, spec, data_dir)
  num_episodes = builder.info.splits[split].num_examples
  ds = builder.as_dataset(split=split, shuffle_files=False)

  def tagged_steps(index, ep):
    metadata = ep.get("episode_metadata", {})
    return ep["steps"].map(lambda s: (index, canonicalize_steps(s, spec, data_dir), metadata))

  steps_ds = ds.enumerate().flat_map(tagged_steps)
  _, step_spec, _ = steps_ds.element_spec
  current, rows, metadata = 0, [], {}
  steps_it = steps_ds.as_numpy_iterator()
  while True:
    try:
      index, step, md = next(steps_it)
    except StopIteration:
      break
    except tf.errors.DataLossError as e:
      raise damaged_shard_error(data_dir, e) from e
    while index > current:  # episode `current` is complete (or had no steps at all)
      yield current, _episode(rows, metadata, step_spec, spec)
      current, rows, metadata = current + 1, [], {}
    rows.append(step)
    metadata = md
  while current < num_episodes:
    yield current, _episode(rows, metadata, step_spec, spec)
    current, rows, metadata = current + 1, [], {}


def _episode(rows, metadata, step_spec, spec: RobotSpec) -> dict[str, Any]:
  if rows:
    steps = tf.nest.map_structure(lambda *xs: np.stack(xs), *rows)
  else:  # an empty episode: zero-length arrays of the right shapes
    steps = tf.nest.map_structure(
        lambda s: np.zeros((0,) + tuple(s.shape), s.dtype.as_numpy_dtype), step_spec)
  if "language_instruction" in steps:
    steps["language_instruction"] = [s.decode("utf-8") for s in steps["language_instruction"]]
  else:
    steps["language_instruction"] = [spec.instruction_text] * len(steps["action"])
  return {"steps": steps, "episode_metadata": _metadata_numpy(metadata)}


def _metadata_numpy(md) -> dict[str, Any]:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else np.asarray(v).item()
          for k, v in md.items()}
