"""Converts users' episodes (.npz files, HDF5 groups, a LeRobotDataset) into our RLDS dataset.

  python -m data_tools.convert --input=DIR --format=npz --config=robot_configs/babyai.py --out=OUT
  python -m data_tools.convert --input=demos.hdf5 --format=hdf5 --hdf5_root=data \
      --config=robot_configs/metaworld.py --out=OUT --keys=image=agentview_rgb,action=actions
  python -m data_tools.convert --input=my_lerobot_dataset --format=lerobot \
      --config=robot_configs/metaworld.py --out=OUT --keys=image=observation.images.top

Input. npz: a folder of *.npz files (or one file), one episode each, in sorted
file name order; loaded without pickle. hdf5: a .h5/.hdf5 file or a folder of
them; every group under --hdf5_root is one episode, in sorted name order.
lerobot: a LeRobotDataset folder in the v3.0 layout (meta/, data/ parquet,
videos/ MP4; data_tools/lerobot.py), one episode per row of its episode
metadata; its keys are LeRobot's feature names, with these defaults: <camera>
-> observation.images.<camera>, state -> observation.state, reward ->
next.reward (zeros without it), language_instruction -> the frame's task string.

Keys of an episode (name -> default source key; `--keys=name=source,...`
overrides, nested HDF5 paths like obs/rgb allowed):
  <camera>             every camera of the robot config, under its own name
                       (image: uint8[T,H,W,3] at the robot's H,W; --resize to resize)
  action               [T,D] (or [T] when D == 1), any int/float dtype
  reward               [T] or [T,1], optional (zeros)
  state                [T,S], required iff the robot has state_dim > 0
  language_instruction one string, or one per step (ignored when the robot's
                       instruction source is "fixed": robot.instruction.text is used)
  is_terminal          [T] bool, optional: only the last step may be True
  terminal             scalar bool, optional: the last step is terminal
  success              scalar bool, optional: the episode succeeded
For HDF5, the scalar keys (language_instruction, terminal, success) may also be
attributes of the episode group.

Terminal vs truncated. The last step is terminal (success or failure ended the
episode) or truncated (a time limit cut it, so learners bootstrap past it).
From, in order: the episode's `is_terminal` or `terminal`; else --terminal=true
or false for every episode; else (--terminal=auto) its `success` flag; else
"the last reward is positive" (sparse success rewards). Episode metadata
`success` is the `success` flag when given, else "last step terminal with a
positive reward".

Dtypes. Actions, rewards and states of any int/float dtype are cast to float32
(float64 loses precision beyond float32; values outside float32 range are
refused); the summary lists the casts. Images must already be uint8: they are
never rescaled and only resized with --resize. Actions are stored as given;
with the robot's out_of_bounds="clip" the summary counts the values outside
the bounds, with "reject" (or --out_of_bounds=reject) they refuse the input.

Every episode is checked (episode.check_episode) and the first bad one stops the
conversion with a message naming the file (and group), step and key; nothing
is left at --out. The statistics are computed while writing and cached beside
the dataset (qsft_vla.data.statistics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import stat
import zipfile
import zlib
from typing import Any, Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (CLI noise)

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import tqdm  # pylint: disable=g-import-not-at-top

from data_tools import cli, lerobot  # pylint: disable=g-import-not-at-top
from qsft_vla.config import ConfigError  # pylint: disable=g-import-not-at-top
from qsft_vla.data import rlds_reader, statistics  # pylint: disable=g-import-not-at-top
from qsft_vla.data.episode import UNKNOWN_NOISE, DataError  # pylint: disable=g-import-not-at-top
from qsft_vla.data.rlds_writer import RLDSWriter  # pylint: disable=g-import-not-at-top
from qsft_vla.robot import RobotSpec  # pylint: disable=g-import-not-at-top

FORMATS = ("npz", "hdf5", "lerobot")
TERMINAL_RULES = ("auto", "true", "false")
_FIXED_KEYS = ("action", "reward", "state", "language_instruction", "is_terminal", "terminal",
               "success")


# --------------------------------------------------------------------------- #
# Key mapping.


def parse_keys(text: str) -> dict[str, str]:
  """"image=rgb,action=actions" -> {"image": "rgb", "action": "actions"}."""
  out: dict[str, str] = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    name, sep, source = (s.strip() for s in item.partition("="))
    if not sep or not name or not source:
      raise ValueError(f"--keys: expected name=source, got {item!r}")
    if name in out:
      raise ValueError(f"--keys: {name!r} is mapped twice")
    out[name] = source
  return out


def source_keys(spec: RobotSpec, key_map: dict[str, str] | None = None,
                fmt: str = "npz") -> dict[str, str]:
  """Our name -> key in the user's files: defaults, overridden by `key_map`."""
  keys = {cam: cam for cam in spec.camera_names}
  keys.update({k: k for k in _FIXED_KEYS})
  if fmt == "lerobot":  # LeRobot's own feature names
    keys.update({cam: f"observation.images.{cam}" for cam in spec.camera_names})
    keys.update(state="observation.state", reward="next.reward",
                language_instruction=lerobot.TASK_KEY)
  unknown = set(key_map or {}) - set(keys)
  if unknown:
    raise ValueError(f"--keys: unknown name(s) {sorted(unknown)}; known: {sorted(keys)}")
  keys.update(key_map or {})
  return keys


def _check_readable_back(spec: RobotSpec) -> None:
  """The writer stores canonical keys; a config mapping them elsewhere could not read them."""
  for name, path in rlds_reader.canonical_step_keys(spec).items():
    if path != name:
      raise ConfigError(
          f"robot.rlds_keys maps {name!r} to {path!r}, but converted datasets store it at "
          f"{name!r}, so this config could not read the result; convert with a config whose "
          "rlds_keys are the defaults")


# --------------------------------------------------------------------------- #
# Sources: one episode of a user's file, read key by key.


@dataclasses.dataclass
class _Source:
  where: str                            # names the episode in errors
  episode_id: str
  path: str
  get: Callable[[str], Any]             # key -> value, None when absent
  names: Callable[[], list[str]]        # keys present (for error messages)


def _regular(path: str) -> str:
  """`path` if it is a regular file; a FIFO, device or socket is refused (reading
  one would hang or never end)."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:  # a dangling or looping symbolic link
    raise DataError(path, f"cannot read it: {e.strerror}") from None
  if not stat.S_ISREG(mode):
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
    raise DataError(path, f"not a regular file ({kind}); refusing to read it")
  return path


def _input_files(input_path: str, matches, what: str) -> list[str]:
  if not os.path.exists(input_path):
    raise DataError(input_path, "input does not exist")
  if not os.path.isdir(input_path):
    return [_regular(input_path)]
  files = sorted(f for f in glob.glob(os.path.join(input_path, "*")) if matches(f))
  if not files:
    raise DataError(input_path, f"no {what} files in this folder")
  return [_regular(f) for f in files]


def _npz_files(input_path: str) -> list[str]:
  return _input_files(input_path, lambda f: f.endswith(".npz"), ".npz")


def _hdf5_files(input_path: str) -> list[str]:
  return _input_files(input_path, lambda f: f.endswith((".h5", ".hdf5")), ".h5/.hdf5")


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _npz_member(z, key: str, path: str):
  """z[key], after checking what its .npy header declares against the bytes the
  archive holds (a header may claim terabytes): never allocates more than the
  member holds, never unpickles, and a bad CRC or a short member is a DataError."""
  try:
    info = z.zip.getinfo(key + ".npy")
    with z.zip.open(info) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
      header = f.tell()
  except (ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise DataError(path, f"not a readable .npy member: {e}", key=key) from e
  if dtype.hasobject:
    raise DataError(path, "holds Python objects, which cannot be loaded without pickle; save "
                    "strings as a unicode array, e.g. np.array('pick up the block')", key=key)
  declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
  held = info.file_size - header
  if declared != held:
    raise DataError(path, f"its header declares a {dtype} array of shape {shape} "
                    f"({declared} bytes) but the member holds {held} bytes", key=key)
  try:
    return z[key]
  except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise DataError(path, f"corrupt archive member: {e}", key=key) from e


def _npz_sources(files: list[str]) -> Iterator[_Source]:
  for path in files:
    with open(path, "rb") as f:
      magic = f.read(6)
    if magic.startswith(_NPY_MAGIC[:6]):
      raise DataError(path, "a single array (.npy), not an .npz archive of named arrays")
    if not magic.startswith(_ZIP_MAGIC):
      raise DataError(path, "not an .npz archive (no zip signature; the file starts with "
                      f"{magic!r})")
    try:
      z = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(path, f"cannot read as .npz: {e}") from e
    with z:
      def get(key, z=z, path=path):
        return _npz_member(z, key, path) if key in z.files else None
      yield _Source(path, os.path.splitext(os.path.basename(path))[0], path, get,
                    lambda z=z: sorted(z.files))


def _hdf5_groups(path: str, root: str):
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise DataError(path, f"cannot open as HDF5: {e}") from e
  try:
    if root not in f or not isinstance(f[root], h5py.Group):
      f.close()
      raise DataError(path, f"no group {root!r} (set --hdf5_root to the group holding the "
                      "episodes)")
    members = sorted(f[root])
  except (KeyError, OSError, RuntimeError) as e:
    f.close()
    raise DataError(path, f"cannot read the HDF5 structure under {root!r}: {e}") from e
  names, skipped = [], []
  for k in members:
    try:  # a dangling external link fails here, by name
      kind = f[root].get(k, getclass=True, getlink=False)
    except (KeyError, OSError, RuntimeError) as e:
      f.close()
      raise DataError(path, f"cannot read member {k!r} under {root!r}: {e}") from e
    (names if kind is h5py.Group else skipped).append(k)
  if skipped:  # metadata arrays beside the episodes are common; say what was left out
    logging.warning("%s: skipping %d member(s) under %r that are not episode groups: %s",
                    path, len(skipped), root, ", ".join(skipped[:10]))
  if not names:
    f.close()
    raise DataError(path, f"no episode groups under {root!r}")
  return f, names


def _hdf5_count(files: list[str], root: str) -> int:
  n = 0
  for path in files:
    f, names = _hdf5_groups(path, root)
    f.close()
    n += len(names)
  return n


def _hdf5_sources(files: list[str], root: str) -> Iterator[_Source]:
  import h5py  # pylint: disable=g-import-not-at-top
  for path in files:
    f, names = _hdf5_groups(path, root)
    with f:
      stem = os.path.splitext(os.path.basename(path))[0]
      for name in names:
        group = f[root][name]
        where = f"{path}, group {name!r}"

        def get(key, group=group, where=where):
          # A dangling external/soft link or a damaged file raises KeyError /
          # OSError / RuntimeError deep in h5py: one line naming the place instead.
          try:
            if key in group:
              obj = group[key]
              if not isinstance(obj, h5py.Dataset):
                raise DataError(where, "is a group, expected a dataset", key=key)
              return obj[()]
            return group.attrs.get(key)  # scalars may be attributes of the group
          except (KeyError, OSError, RuntimeError) as e:
            raise DataError(where, f"cannot read: {e}", key=key) from e

        def names_fn(group=group):
          found = []
          group.visititems(lambda k, v: found.append(k) if isinstance(v, h5py.Dataset) else None)
          return sorted(found) + [f"@{a}" for a in sorted(group.attrs)]

        yield _Source(where, f"{stem}/{name}", path, get, names_fn)


# --------------------------------------------------------------------------- #
# One user episode -> our canonical episode dict.


@dataclasses.dataclass
class _Options:
  keys: dict[str, str]
  terminal: str
  resize: bool


def _require(src: _Source, key: str, name: str):
  value = src.get(key)
  if value is None:
    raise DataError(src.where, f"missing (needed for {name}); present: {src.names()}; "
                    f"map another key with --keys={name}=<key>", key=key)
  return value


def _float32(value, src: _Source, key: str, casts: set[str]) -> np.ndarray:
  x = np.asarray(value)
  if x.dtype.kind not in "biuf":
    raise DataError(src.where, f"expected numbers, got dtype {x.dtype}", key=key)
  if x.dtype == np.float32:
    return x
  y = x.astype(np.float32)
  if x.dtype.kind == "f":
    over = np.isfinite(x) & ~np.isfinite(y)
    if over.any():
      t = int(np.argmax(over.reshape(over.shape[0], -1).any(axis=1))) if x.ndim else None
      raise DataError(src.where, "value outside the float32 range", step=t, key=key)
  casts.add(f"{key}: {x.dtype} -> float32")
  return y


def _flag(value, src: _Source, key: str) -> np.ndarray:
  x = np.asarray(value)
  if x.dtype.kind not in "biuf" or not np.all((x == 0) | (x == 1)):
    raise DataError(src.where, f"expected booleans (or 0/1), got {x.dtype} {x.ravel()[:5]}",
                    key=key)
  return x.astype(np.bool_)


def _scalar_flag(value, src: _Source, key: str) -> bool:
  x = _flag(value, src, key)
  if x.size != 1:
    raise DataError(src.where, f"expected one boolean for the episode, got shape {x.shape}",
                    key=key)
  return bool(x.reshape(()))


def _text(s, src: _Source, key: str, step: int | None = None) -> str:
  if isinstance(s, np.generic):
    s = s.item()
  if isinstance(s, bytes):
    try:
      return s.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(src.where, f"not UTF-8 text: {e}", step=step, key=key) from e
  if isinstance(s, str):
    return s
  raise DataError(src.where, f"expected a string, got {type(s).__name__}", step=step, key=key)


def _instructions(value, src: _Source, key: str, length: int) -> list[str]:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if not isinstance(value, np.ndarray):  # one string for the whole episode
    return [_text(value, src, key)] * length
  if value.ndim != 1:
    raise DataError(src.where, f"expected one string or one per step, got shape {value.shape}",
                    key=key)
  return [_text(s, src, key, step=t) for t, s in enumerate(value)]


def _resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))
                   for frame in images])


def _episode(src: _Source, spec: RobotSpec, opt: _Options,
             casts: set[str]) -> tuple[dict[str, Any], bool]:
  """Returns (canonical episode, whether its images were resized)."""
  keys = opt.keys
  action = _float32(_require(src, keys["action"], "action"), src, keys["action"], casts)
  if action.ndim == 1 and spec.action_dim == 1:
    action = action[:, None]
  if action.ndim == 0:
    raise DataError(src.where, f"expected shape (T, {spec.action_dim}), got a scalar",
                    key=keys["action"])
  length = action.shape[0]
  if length == 0:
    raise DataError(src.where, "empty episode (0 steps)", key=keys["action"])

  observation, resized = {}, False
  for cam in spec.cameras:
    key = keys[cam.name]
    img = np.asarray(_require(src, key, cam.name))
    if img.dtype != np.uint8:
      raise DataError(src.where, f"expected dtype uint8 images (0..255), got {img.dtype}; "
                      "convert them to uint8 first", key=key)
    if img.ndim == 4 and img.shape[-1] == 3 and img.shape[1:3] != (cam.height, cam.width):
      if not opt.resize:
        raise DataError(src.where, f"expected images of {cam.height}x{cam.width} (robot camera "
                        f"{cam.name!r}), got shape {img.shape}; pass --resize to resize them",
                        key=key)
      img, resized = _resize(img, cam.height, cam.width), True
    observation[cam.name] = img
  if spec.state_dim:
    observation["state"] = _float32(_require(src, keys["state"], "state"), src, keys["state"],
                                    casts)

  reward = src.get(keys["reward"])
  if reward is None:
    reward = np.zeros(length, np.float32)
  else:
    reward = _float32(reward, src, keys["reward"], casts)
    if reward.ndim == 2 and reward.shape[1] == 1:
      reward = reward[:, 0]

  if spec.instruction_source == "fixed":
    instructions = [spec.instruction_text] * length
  else:
    key = keys["language_instruction"]
    instructions = _instructions(_require(src, key, "language_instruction"), src, key, length)

  success = src.get(keys["success"])
  success = None if success is None else _scalar_flag(success, src, keys["success"])
  last_reward = float(reward[-1]) if reward.shape == (length,) else 0.0
  is_terminal = np.zeros(length, np.bool_)
  step_terminal = src.get(keys["is_terminal"])
  scalar_terminal = src.get(keys["terminal"])
  if step_terminal is not None:
    is_terminal = _flag(step_terminal, src, keys["is_terminal"])
  elif scalar_terminal is not None:
    is_terminal[-1] = _scalar_flag(scalar_terminal, src, keys["terminal"])
  elif opt.terminal != "auto":
    is_terminal[-1] = opt.terminal == "true"
  else:
    is_terminal[-1] = success if success is not None else last_reward > 0
  last_terminal = bool(is_terminal.reshape(-1)[-1]) if is_terminal.size else False
  if success is None:
    success = last_terminal and last_reward > 0

  steps = {"observation": observation, "action": action, "reward": reward,
           "discount": np.ones(length, np.float32),
           "is_first": np.arange(length) == 0, "is_last": np.arange(length) == length - 1,
           "is_terminal": is_terminal, "language_instruction": instructions}
  metadata = {"episode_id": src.episode_id, "source": os.path.abspath(src.path),
              "noise": UNKNOWN_NOISE, "success": success}
  return {"steps": steps, "episode_metadata": metadata}, resized


def _rename_key(e: DataError, spec: RobotSpec, keys: dict[str, str]) -> DataError:
  """check_episode names our RLDS keys; the user knows their own source keys."""
  ours = {f"observation/{c}": keys[c] for c in spec.camera_names}
  ours.update({"observation/state": keys["state"], "action": keys["action"],
               "reward": keys["reward"], "language_instruction": keys["language_instruction"],
               "is_terminal": keys["is_terminal"]})
  source = ours.get(e.key)
  if source is None or source == e.key:
    return e
  return DataError(e.where, f"{e.what} [RLDS key {e.key!r}]", step=e.step, key=source)


# --------------------------------------------------------------------------- #
# The conversion.


def _as_spec(robot) -> RobotSpec:
  if isinstance(robot, RobotSpec):
    return robot
  return RobotSpec.from_config(robot.robot if "robot" in robot else robot)


def convert(input_path: str, fmt: str, robot_spec, out: str,
            key_map: dict[str, str] | None = None, *, terminal: str = "auto",
            resize: bool = False, out_of_bounds: str | None = None, hdf5_root: str = "/",
            name: str | None = None, overwrite: bool = False, episodes_per_shard: int = 100,
            compute_stats: bool = True, progress: bool = True) -> dict[str, Any]:
  """Converts `input_path` to an RLDS dataset at `out`; returns a summary dict.

  Args:
    input_path: npz: a folder of .npz files or one file; hdf5: a file or a folder of them.
    fmt: "npz" or "hdf5".
    robot_spec: a RobotSpec, or a config (with a `robot` section).
    out: the dataset directory to create (must not exist unless overwrite).
    key_map: our name -> source key, overriding the defaults (module docstring).
    terminal: "auto" | "true" | "false": the last step's terminal flag when the
      episode does not say (module docstring).
    resize: resize images of another size to the robot's camera size.
    out_of_bounds: "clip" | "reject"; None = the robot's policy.
    hdf5_root: the group holding the episode groups.
    name: TFDS dataset name (default: the robot name).
    compute_stats: compute and cache the statistics while writing.

  Raises:
    DataError naming the file (group), step and key of the first bad episode;
    nothing is left at `out` then.
  """
  spec = _as_spec(robot_spec)
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
  if terminal not in TERMINAL_RULES:
    raise ValueError(f"--terminal must be one of {TERMINAL_RULES}, got {terminal!r}")
  if out_of_bounds not in (None, "clip", "reject"):
    raise ValueError(f"--out_of_bounds must be clip or reject, got {out_of_bounds!r}")
  if out_of_bounds:
    spec = dataclasses.replace(spec, out_of_bounds=out_of_bounds)
  _check_readable_back(spec)
  opt = _Options(source_keys(spec, key_map, fmt), terminal, resize)
  if fmt == "npz":
    files = _npz_files(input_path)
    total, sources = len(files), _npz_sources(files)
  elif fmt == "lerobot":
    total, sources = lerobot.count(input_path), lerobot.sources(input_path, _Source)
  else:
    files = _hdf5_files(input_path)
    total, sources = _hdf5_count(files, hdf5_root), _hdf5_sources(files, hdf5_root)
  name = name or re.sub(r"[^a-z0-9_]", "_", spec.name.lower())

  casts: set[str] = set()
  oob = {d.name: 0 for d in spec.action_dims}
  counts = {"resized": 0, "terminal": 0, "success": 0}
  acc = statistics.Accumulator(spec) if compute_stats else None
  provenance = {"tool": "data_tools.convert", "input": os.path.abspath(input_path),
                "format": fmt, "keys": opt.keys, "terminal": terminal, "resize": resize,
                "hdf5_root": hdf5_root}
  with RLDSWriter(out, spec, name=name, provenance=provenance, overwrite=overwrite,
                  protect=[input_path], episodes_per_shard=episodes_per_shard,
                  description=f"Converted from {fmt} by data_tools.convert") as writer:
    with contextlib.closing(sources):
      for src in tqdm.tqdm(sources, total=total, unit="ep", desc="convert", disable=not progress):
        episode, resized = _episode(src, spec, opt, casts)
        try:
          report = writer.add(episode, where=src.where)
        except DataError as e:
          raise _rename_key(e, spec, opt.keys) from None
        for dim, n in report["out_of_bounds"].items():
          oob[dim] += n
        counts["resized"] += resized
        counts["terminal"] += bool(episode["steps"]["is_terminal"][-1])
        counts["success"] += bool(episode["episode_metadata"]["success"])
        if acc is not None:
          acc.add(episode, src.where)
    writer.provenance["casts"] = sorted(casts)
  summary = {"out": writer.out, "episodes": writer.num_episodes, "steps": writer.num_steps,
             "bytes": cli.dir_bytes(writer.out), "out_of_bounds_policy": spec.out_of_bounds,
             "out_of_bounds": {k: v for k, v in oob.items() if v}, "casts": sorted(casts),
             "resized_episodes": counts["resized"], "terminal_episodes": counts["terminal"],
             "success_episodes": counts["success"], "stats_path": None}
  if acc is not None:
    summary["stats_path"] = statistics.save(writer.out, spec, acc.result(writer.out))
  return summary


def format_summary(s: dict[str, Any]) -> str:
  lines = [f"wrote {s['out']}",
           f"  episodes {s['episodes']}, steps {s['steps']}, {s['bytes']:,} bytes",
           f"  terminal episodes {s['terminal_episodes']}, successes {s['success_episodes']}"]
  if s["resized_episodes"]:
    lines.append(f"  resized images in {s['resized_episodes']} episode(s)")
  for cast in s["casts"]:
    lines.append(f"  cast {cast}")
  if s["out_of_bounds"]:
    per_dim = ", ".join(f"{k}: {v}" for k, v in s["out_of_bounds"].items())
    lines.append(f"  actions outside the bounds (stored as given, clipped when tokenized): "
                 f"{per_dim}")
  if s["stats_path"]:
    lines.append(f"  statistics: {s['stats_path']}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Binary.


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("input", None, "Folder of .npz files, .h5/.hdf5 file(s), or a "
                      "LeRobotDataset folder (v3.0).", required=True)
  flags.DEFINE_enum("format", None, list(FORMATS), "Input format.", required=True)
  flags.DEFINE_string("config", None, "Robot config: robot_configs/<x>.py[:variant].",
                      required=True)
  flags.DEFINE_string("out", None, "Dataset directory to create.", required=True)
  flags.DEFINE_string("keys", "", "Key mapping name=source,... (e.g. image=rgb,action=actions).")
  flags.DEFINE_enum("terminal", "auto", list(TERMINAL_RULES),
                    "Last-step terminal flag when an episode does not say; auto: its success "
                    "flag, else last reward > 0.")
  flags.DEFINE_bool("resize", False, "Resize images to the robot's camera size.")
  flags.DEFINE_enum("out_of_bounds", None, ["clip", "reject"],
                    "Override the robot's out-of-bounds policy.")
  flags.DEFINE_string("hdf5_root", "/", "HDF5 group whose child groups are the episodes.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out (only once complete).")
  flags.DEFINE_bool("stats", True, "Compute and cache the dataset statistics.")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return cli.run("convert", lambda: format_summary(convert(
      f.input, f.format, cli.load_robot(f.config), f.out, parse_keys(f.keys),
      terminal=f.terminal, resize=f.resize, out_of_bounds=f.out_of_bounds,
      hdf5_root=f.hdf5_root, overwrite=f.overwrite, compute_stats=f.stats)))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
