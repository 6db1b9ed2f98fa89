"""The bad-input corpus: wrong, damaged and hostile inputs for every entry point.

Each case builds its inputs in its own empty folder (copying the shared fixtures
it needs: a tiny BabyAI RLDS dataset, a tiny Q-SFT checkpoint) and returns what
to run: a binary's argv, or, for the robot-host API, a function to call. Beside
it are the parts its one-line message must hold: the place (file, episode, step,
key, field, flag) and what was expected. harness.py runs and classifies them;
tests/test_bad_inputs.py asserts every case ends as it should.

The cases are the reliability issue's list (lost data, silent garbage, raw
tracebacks, misleading messages, a hang) and the classes around them. Heavier
cases that need a training run (a non-finite loss, a kill -9 mid-save, a refused
resume) live in tests/test_train.py; the 10,000-observation fuzz of act() in
tests/test_controller_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import zipfile
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BABYAI = os.path.join(REPO, "robot_configs", "babyai.py")
METAWORLD = os.path.join(REPO, "robot_configs", "metaworld.py")

# What each entry point's driver imports once before forking its cases.
IMPORTS = {
    "data_tools.convert": ("data_tools.convert", "h5py"),
    "data_tools.generate": ("data_tools.generate",),
    "data_tools.stats": ("data_tools.stats",),
    "data_tools.validate": ("data_tools.validate",),
    "qsft_vla.train": ("qsft_vla.train",),
    "qsft_vla.evaluate": ("qsft_vla.evaluate",),
    "qsft_vla.serve": ("qsft_vla.serve",),
    "qsft_vla.replay.server": ("qsft_vla.replay.server",),
    "qsft_vla.replay.insert": ("qsft_vla.replay.insert",),
    "qsft_vla.replay.actor": ("qsft_vla.replay.actor",),
    "api": ("qsft_vla.policy.controller",),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  entry: str                         # a module run as `python -m`, or "api"
  setup: Callable[[str, dict], Any]  # (its folder, fixtures) -> argv, or a function (api)
  parts: tuple[str, ...]             # what the output must name
  expect: str = "refused"            # or "warned": exit 0 with the parts in the output
  may_write: tuple[str, ...] = ()    # what a "warned" run may create (path prefixes)
  timeout: float = 120.0
  file_size_limit: int | None = None  # bytes: a file may not grow past this (a full disk)
  teardown: Callable[[str], None] | None = None  # after the run (e.g. make it deletable again)


CASES: dict[str, Case] = {}


def case(entry: str, *parts: str, name: str | None = None, expect: str = "refused",
         may_write: tuple[str, ...] = (), timeout: float = 120.0,
         file_size_limit: int | None = None, teardown: Callable[[str], None] | None = None):
  def register(setup):
    n = name or setup.__name__
    assert n not in CASES, f"two cases named {n}"
    CASES[n] = Case(n, entry, setup, parts, expect, may_write, timeout, file_size_limit,
                    teardown)
    return setup
  return register


# --------------------------------------------------------------------------- #
# Building blocks.

def _babyai_episode(rng, length=6, instruction="go to the red ball"):
  return {"image": rng.integers(0, 256, (length, 56, 56, 3), dtype=np.uint8),
          "action": rng.integers(0, 7, (length,)),
          "language_instruction": np.array(instruction)}


def _metaworld_episode(rng, length=6):
  return {"image": rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8),
          "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32),
          "state": rng.normal(size=(length, 39)).astype(np.float32),
          "reward": np.zeros(length, np.float32),
          "language_instruction": np.array("reach the goal")}


def _npz(folder, name, arrays):
  os.makedirs(folder, exist_ok=True)
  np.savez(os.path.join(folder, name), **arrays)


def _convert(d, *extra, config=BABYAI, fmt="npz", inp=None, out=None):
  return [f"--input={inp or os.path.join(d, 'in')}", f"--format={fmt}", f"--config={config}",
          f"--out={out or os.path.join(d, 'out')}", *extra]


def _copy(fixtures, key, d, name):
  dst = os.path.join(d, name)
  shutil.copytree(fixtures[key], dst, symlinks=True)
  return dst


def _flip(path, offset=None, mask=0xFF):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2 if offset is None else offset)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ mask]))


def _truncate(path, keep=0.5):
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))


def _read_only(path):
  """No one may write in `path`, root included: the mode, and as root the immutable flag
  (root ignores the mode, as it would a read-only mount's absence)."""
  os.chmod(path, 0o555)
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", path], check=True, capture_output=True)


def _writable_again(d):
  for root, dirs, _ in os.walk(d):
    for name in dirs:
      path = os.path.join(root, name)
      if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", path], check=False, capture_output=True)
      os.chmod(path, 0o755)


def _largest(folder, pattern=""):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if pattern in f]
  return max(files, key=os.path.getsize)


def _shards(data):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if "tfrecord" in f)


# --------------------------------------------------------------------------- #
# data_tools.convert: episode content. (config, good + bad files, extra flags, parts)

def _content(rng, kind):
  good = lambda: _babyai_episode(rng)  # noqa: E731
  mw = lambda: _metaworld_episode(rng)  # noqa: E731
  ep = good()
  if kind == "nan_action":
    ep = mw()
    ep["action"][3, 2] = np.nan
    return METAWORLD, {"a.npz": mw(), "b.npz": ep}, [], ["b.npz", "step 3", "'action'", "non-finite"]
  if kind == "inf_reward":
    ep["reward"] = np.array([0, 0, np.inf, 0, 0, 0], np.float32)
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "step 2", "'reward'", "non-finite"]
  if kind == "nan_state":
    ep = mw()
    ep["state"][1, 7] = np.nan
    return METAWORLD, {"a.npz": ep}, [], ["a.npz", "step 1", "'state'", "non-finite"]
  if kind == "missing_image":
    del ep["image"]
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'image'", "missing"]
  if kind == "missing_state":
    ep = mw()
    del ep["state"]
    return METAWORLD, {"a.npz": ep}, [], ["a.npz", "'state'", "missing"]
  if kind == "image_shape":
    ep["image"] = ep["image"][:, :48]
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'image'", "56x56"]
  if kind == "image_rgba":
    ep["image"] = np.concatenate([ep["image"], ep["image"][..., :1]], -1)
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'image'", "(6, 56, 56, 3)", "(6, 56, 56, 4)"]
  if kind == "image_float":
    ep["image"] = ep["image"].astype(np.float32) / 255
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'image'", "uint8", "float32"]
  if kind == "empty_episode":
    ep["image"], ep["action"] = ep["image"][:0], ep["action"][:0]
    return BABYAI, {"a.npz": good(), "b.npz": ep}, [], ["b.npz", "empty episode"]
  if kind == "length_mismatch":
    ep["action"] = ep["action"][:5]
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'image'", "(5, 56, 56, 3)", "(6, 56, 56, 3)"]
  if kind == "discrete_value":
    ep["action"][2] = 9
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "step 2", "'action'", "not in"]
  if kind == "discrete_negative":
    ep["action"][1] = -1
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "step 1", "'action'", "not in"]
  if kind == "discrete_fraction":
    ep["action"] = ep["action"].astype(np.float32) + 0.5
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "step 0", "'action'", "not in"]
  if kind == "action_width":
    ep = mw()
    ep["action"] = ep["action"][:, :3]
    return METAWORLD, {"a.npz": ep}, [], ["a.npz", "'action'", "4"]
  if kind == "out_of_bounds_reject":
    ep = mw()
    ep["action"][4, 0] = -1.25
    return METAWORLD, {"a.npz": ep}, ["--out_of_bounds=reject"], ["a.npz", "step 4", "'action'",
                                                                  "outside [-1.0, 1.0]"]
  if kind == "mapped_key_inf":
    ep = mw()
    ep["acts"] = ep.pop("action")
    ep["acts"][1, 0] = np.inf
    return METAWORLD, {"a.npz": ep}, ["--keys=action=acts"], ["a.npz", "step 1", "'acts'"]
  if kind == "terminal_not_last":
    ep["is_terminal"] = np.array([0, 0, 1, 0, 0, 0], bool)
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "step 2", "'is_terminal'", "last step"]
  if kind == "object_instruction":
    ep["language_instruction"] = np.array(["a", None], dtype=object)
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'language_instruction'"]
  if kind == "instruction_count":
    ep["language_instruction"] = np.array(["go"] * 4)
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'language_instruction'", "4", "6"]
  if kind == "blank_instruction":
    ep["language_instruction"] = np.array("   ")
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'language_instruction'"]
  if kind == "zero_width_instruction":
    ep["language_instruction"] = np.array("\u200b\u200b\ufeff")
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'language_instruction'"]
  if kind == "lone_surrogate_instruction":
    ep["language_instruction"] = np.array("go to the \ud800 ball")
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'language_instruction'"]
  if kind == "bytes_not_utf8":
    ep["language_instruction"] = np.array(b"go to \xff\xfe ball")
    return BABYAI, {"a.npz": ep}, [], ["a.npz", "'language_instruction'"]
  raise ValueError(kind)


CONTENT = ("nan_action", "inf_reward", "nan_state", "missing_image", "missing_state",
           "image_shape", "image_rgba", "image_float", "empty_episode", "length_mismatch",
           "discrete_value", "discrete_negative", "discrete_fraction", "action_width",
           "out_of_bounds_reject", "mapped_key_inf", "terminal_not_last", "object_instruction",
           "instruction_count", "blank_instruction", "zero_width_instruction",
           "lone_surrogate_instruction", "bytes_not_utf8")


def _content_case(kind):
  config, files, extra, parts = _content(np.random.default_rng(CONTENT.index(kind)), kind)

  def setup(d, fixtures):
    for name, arrays in files.items():
      _npz(os.path.join(d, "in"), name, arrays)
    return _convert(d, *extra, config=config)
  case("data_tools.convert", *parts, name=f"convert_{kind}")(setup)


for _kind in CONTENT:
  _content_case(_kind)


# data_tools.convert: damaged and hostile files.

def _damaged(d, kind, rng):
  src = os.path.join(d, "in")
  _npz(src, "a.npz", _babyai_episode(rng))
  b = os.path.join(src, "b.npz")
  if kind == "bad_crc":
    _npz(src, "b.npz", _babyai_episode(rng))
    with zipfile.ZipFile(b) as z:
      info = z.getinfo("image.npy")
    _flip(b, info.header_offset + 30 + len(info.filename) + info.file_size // 2)
  elif kind == "huge_header":  # claims ~14.6 TiB over 64 bytes
    with zipfile.ZipFile(b, "w") as z:
      for key, value in _babyai_episode(rng).items():
        with z.open(key + ".npy", "w") as f:
          if key == "image":
            header = np.lib.format.header_data_from_array_1_0(value)
            header["shape"] = (4_000_000, 4_000_000)
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
          else:
            np.lib.format.write_array(f, np.asarray(value))
  elif kind in ("zeros", "random", "empty_file"):
    with open(b, "wb") as f:
      f.write({"zeros": bytes(4096), "random": rng.bytes(4096), "empty_file": b""}[kind])
  elif kind == "single_npy":
    with open(b, "wb") as f:
      np.save(f, np.zeros(3))
  elif kind == "truncated":
    _npz(src, "b.npz", _babyai_episode(rng))
    _truncate(b)
  elif kind == "pickled_member":
    np.savez(b, image=np.array([object()], dtype=object), action=np.zeros(6))
  elif kind == "fifo":
    os.mkfifo(b)
  elif kind == "directory":
    os.mkdir(b)
  elif kind == "dev_zero":  # endless zeros: reading it would never end
    os.symlink("/dev/zero", b)
  elif kind == "dangling_link":
    os.symlink(os.path.join(d, "nowhere.npz"), b)
  elif kind == "link_loop":
    os.symlink(b, b)
  else:
    raise ValueError(kind)


DAMAGED = {"bad_crc": ["b.npz", "'image'", "CRC"],
           "huge_header": ["b.npz", "'image'", "(4000000, 4000000)"],
           "zeros": ["b.npz", "not an .npz archive"], "random": ["b.npz", "not an .npz archive"],
           "empty_file": ["b.npz"], "single_npy": ["b.npz", "single array"],
           "truncated": ["b.npz"], "pickled_member": ["b.npz", "'image'"],
           "fifo": ["b.npz", "not a regular file"], "directory": ["b.npz", "a folder"],
           "dev_zero": ["b.npz", "not a regular file"],
           "dangling_link": ["b.npz", "No such file"],
           "link_loop": ["b.npz", "symbolic links"]}


def _damaged_case(kind, parts):
  def setup(d, fixtures):
    _damaged(d, kind, np.random.default_rng(len(kind)))
    return _convert(d)
  case("data_tools.convert", *parts, name=f"convert_damaged_{kind}", timeout=60)(setup)


for _kind, _parts in DAMAGED.items():
  _damaged_case(_kind, _parts)


# data_tools.convert: HDF5.

def _h5(path, seed=0, **replace):
  import h5py  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with h5py.File(path, "w") as f:
    g = f.create_group("ep0")
    ep = _metaworld_episode(np.random.default_rng(seed), 5)
    g.attrs["language_instruction"] = str(ep.pop("language_instruction"))
    for k, v in ep.items():
      g[k] = replace.get(k, v)
  return path


def _h5_case(kind, parts, hdf5_root="/", **expect):
  def setup(d, fixtures):
    import h5py  # pylint: disable=g-import-not-at-top
    path = os.path.join(d, "in", "d.h5")
    if kind == "dangling_link_key":
      _h5(path, state=h5py.ExternalLink("missing.h5", "/state"))
    else:
      _h5(path)
    if kind == "dangling_link_episode":
      with h5py.File(path, "a") as f:
        f["ep1"] = h5py.ExternalLink("missing.h5", "/ep")
    elif kind.startswith("flip_"):
      _flip(path, int(kind[5:]))
    elif kind == "truncated":
      _truncate(path)
    elif kind == "text":
      with open(path, "w") as f:
        f.write("not hdf5\n")
    elif kind == "nan_state":
      with h5py.File(path, "a") as f:
        f["ep0"]["state"][2, 7] = np.nan
    elif kind == "episode_not_group":
      with h5py.File(path, "a") as f:
        f["ep1"] = np.zeros(3)
    return _convert(d, f"--hdf5_root={hdf5_root}", config=METAWORLD, fmt="hdf5", inp=path)
  case("data_tools.convert", *parts, name=f"convert_hdf5_{kind}", **expect)(setup)


for _kind, _parts, _root, *_expect in [
    ("dangling_link_key", ["d.h5", "'ep0'", "'state'"], "/"),
    ("dangling_link_episode", ["d.h5", "ep1"], "/"),
    ("flip_0", ["d.h5", "HDF5"], "/"), ("flip_8", ["d.h5", "HDF5"], "/"),
    ("flip_96", ["d.h5", "HDF5"], "/"), ("truncated", ["d.h5"], "/"),
    ("text", ["d.h5", "HDF5"], "/"), ("nan_state", ["d.h5", "'ep0'", "step 2", "'state'"], "/"),
    ("episode_not_group", ["d.h5", "ep1", "not episode groups"], "/",
     dict(expect="warned", may_write=("out",))),  # metadata beside the episodes: skipped, said
    ("missing_root", ["d.h5", "data"], "data")]:
  _h5_case(_kind, _parts, _root, **(_expect[0] if _expect else {}))


# data_tools.convert: arguments and where the output goes (nothing of the user's is lost).

def _one_npz(d):
  _npz(os.path.join(d, "in"), "a.npz", _babyai_episode(np.random.default_rng(0)))


def _convert_one_npz(d, *extra):
  _one_npz(d)
  return _convert(d, *extra)


@case("data_tools.convert", "nowhere", "does not exist")
def convert_missing_input(d, fixtures):
  return _convert(d, inp=os.path.join(d, "nowhere"))


@case("data_tools.convert", ".npz")
def convert_no_npz_files(d, fixtures):
  os.makedirs(os.path.join(d, "in"))
  with open(os.path.join(d, "in", "notes.txt"), "w") as f:
    f.write("mine")
  return _convert(d)


@case("data_tools.convert", "in")
def convert_hdf5_format_on_npz_folder(d, fixtures):
  _one_npz(d)
  return _convert(d, fmt="hdf5")


@case("data_tools.convert", "--format", "tfrecord")
def convert_unknown_format(d, fixtures):
  _one_npz(d)
  return _convert(d, fmt="tfrecord")


@case("data_tools.convert", "holds the input")
def convert_out_is_input(d, fixtures):
  _one_npz(d)
  return _convert(d, "--overwrite", out=os.path.join(d, "in"))


@case("data_tools.convert", "holds the input")
def convert_out_is_parent_of_input(d, fixtures):
  _one_npz(d)
  return _convert(d, "--overwrite", out=d)


@case("data_tools.convert", "a_file")
def convert_out_under_a_file(d, fixtures):
  _one_npz(d)
  with open(os.path.join(d, "a_file"), "w") as f:
    f.write("mine")
  return _convert(d, out=os.path.join(d, "a_file", "out"))


@case("data_tools.convert", "a_file", "not a dataset directory")
def convert_overwrite_a_file(d, fixtures):
  _one_npz(d)
  with open(os.path.join(d, "a_file"), "w") as f:
    f.write("mine")
  return _convert(d, "--overwrite", out=os.path.join(d, "a_file"))


@case("data_tools.convert", "user", "exists")
def convert_out_is_users_folder(d, fixtures):
  _one_npz(d)
  os.makedirs(os.path.join(d, "user"))
  with open(os.path.join(d, "user", "notes.txt"), "w") as f:
    f.write("mine")
  return _convert(d, out=os.path.join(d, "user"))


@case("data_tools.convert", "notes.txt")
def convert_overwrite_users_folder(d, fixtures):
  _one_npz(d)
  os.makedirs(os.path.join(d, "user"))
  with open(os.path.join(d, "user", "notes.txt"), "w") as f:
    f.write("mine")
  return _convert(d, "--overwrite", out=os.path.join(d, "user"))


@case("data_tools.convert", "extra.txt")
def convert_overwrite_dataset_with_users_file(d, fixtures):
  _one_npz(d)
  out = _copy(fixtures, "babyai_data", d, "out")
  with open(os.path.join(out, "extra.txt"), "w") as f:
    f.write("added by the user")
  return _convert(d, "--overwrite", out=out)


@case("data_tools.convert", "locked/", teardown=_writable_again)
def convert_out_in_read_only_folder(d, fixtures):
  _one_npz(d)
  os.makedirs(os.path.join(d, "locked"))
  _read_only(os.path.join(d, "locked"))
  return _convert(d, out=os.path.join(d, "locked", "out"))


@case("data_tools.convert", "nope.py")
def convert_missing_config(d, fixtures):
  _one_npz(d)
  return _convert(d, config=os.path.join(REPO, "robot_configs", "nope.py"))


@case("data_tools.convert", "nope", "variant")
def convert_unknown_variant(d, fixtures):
  _one_npz(d)
  return _convert(d, config=BABYAI + ":nope")


@case("data_tools.convert", "config.py")
def convert_config_not_python(d, fixtures):
  _one_npz(d)
  with open(os.path.join(d, "config.py"), "w") as f:
    f.write("this is not python (\n")
  return _convert(d, config=os.path.join(d, "config.py"))


for _name, _extra, _parts in [
    ("keys_malformed", "--keys=image:rgb", ["image:rgb", "name=source"]),
    ("keys_twice", "--keys=image=a,image=b", ["image", "twice"]),
    ("keys_unknown_name", "--keys=rgb=image", ["rgb", "unknown name"]),
    ("keys_missing_source", "--keys=image=pixels", ["a.npz", "'pixels'"]),
]:
  case("data_tools.convert", *_parts, name=f"convert_{_name}")(
      lambda d, fixtures, _extra=_extra: _convert_one_npz(d, _extra))


# A full disk, for real: the OS refuses to let any file grow past 64 kB (EFBIG).
@case("data_tools.convert", "File too large", file_size_limit=64_000)
def convert_disk_full(d, fixtures):
  rng = np.random.default_rng(1)
  for i in range(6):
    _npz(os.path.join(d, "in"), f"e{i}.npz", _babyai_episode(rng))
  return _convert(d)


# --------------------------------------------------------------------------- #
# data_tools.convert --format=lerobot: damaged LeRobotDatasets (v3.0 layout).

def _lerobot(d, fixtures, damage, *extra):
  root = _copy(fixtures, "lerobot", d, "in")
  damage(root)
  return _convert(d, "--keys=image=observation.images.top", *extra, config=METAWORLD,
                  fmt="lerobot")


def _lerobot_info(edit):
  def damage(root):
    path = os.path.join(root, "meta", "info.json")
    with open(path) as f:
      info = json.load(f)
    edit(info)
    with open(path, "w") as f:
      json.dump(info, f)
  return damage


def _lerobot_episodes(edit):
  def damage(root):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    path = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
    rows = pq.read_table(path).to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)
  return damage


def _cut(rel, keep=0.5):
  def damage(root):
    path = os.path.join(root, rel)
    with open(path, "r+b") as f:
      f.truncate(int(os.path.getsize(path) * keep))
  return damage


_VIDEO_1 = "videos/observation.images.top/chunk-000/file-001.mp4"
_DATA_0 = "data/chunk-000/file-000.parquet"
for _name, _damage, _parts in [
    ("no_info", lambda r: os.remove(os.path.join(r, "meta", "info.json")),
     ["in", "meta/info.json"]),
    ("info_not_json", lambda r: open(os.path.join(r, "meta", "info.json"), "w").write("{"),
     ["info.json", "unreadable"]),
    ("v2_layout", _lerobot_info(lambda i: i.update(codebase_version="v2.1")),
     ["info.json", "v2.1", "v3"]),
    ("no_data_path", _lerobot_info(lambda i: i.pop("data_path")), ["info.json", "data_path"]),
    ("no_episode_metadata", lambda r: shutil.rmtree(os.path.join(r, "meta", "episodes")),
     ["in", "meta/episodes"]),
    ("no_tasks", lambda r: os.remove(os.path.join(r, "meta", "tasks.parquet")),
     ["tasks.parquet", "missing"]),
    ("missing_video", lambda r: os.remove(os.path.join(r, _VIDEO_1)),
     ["episode 2", "file-001.mp4", "missing"]),
    ("truncated_video", _cut(_VIDEO_1, 0.4), ["episode 2", "file-001.mp4"]),
    ("video_not_mp4", lambda r: open(os.path.join(r, _VIDEO_1), "wb").write(b"not a video"),
     ["episode 2", "file-001.mp4"]),
    ("truncated_parquet", _cut(_DATA_0), ["file-000.parquet", "parquet"]),
    ("length_disagrees", _lerobot_episodes(lambda rows: rows[1].update(length=9)),
     ["episode 1", "9"]),
    ("timestamps_past_the_video",
     _lerobot_episodes(lambda rows: rows[2].update(
         {"videos/observation.images.top/from_timestamp": 30.0})),
     ["episode 2", "file-001.mp4", "no frame at"]),
    ("unknown_task_index", lambda r: __import__("pyarrow.parquet").parquet.write_table(
        __import__("pyarrow").table({"task_index": [5], "__index_level_0__": ["x"]}),
        os.path.join(r, "meta", "tasks.parquet")), ["episode 0", "task_index"]),
]:
  case("data_tools.convert", *_parts, name=f"convert_lerobot_{_name}")(
      lambda d, fixtures, _damage=_damage: _lerobot(d, fixtures, _damage))


@case("data_tools.convert", "observation.images.image", "--keys")
def convert_lerobot_default_camera_key_absent(d, fixtures):
  root = _copy(fixtures, "lerobot", d, "in")
  return _convert(d, config=METAWORLD, fmt="lerobot", inp=root)


@case("data_tools.convert", "lerobot", "not a folder")
def convert_lerobot_input_is_a_file(d, fixtures):
  path = os.path.join(d, "lerobot")
  with open(path, "w") as f:
    f.write("x")
  return _convert(d, config=METAWORLD, fmt="lerobot", inp=path)


# --------------------------------------------------------------------------- #
# data_tools.generate

def _generate(d, *extra, env="babyai:BabyAI-GoToLocal-v0", out=None):
  return [f"--env={env}", "--episodes=2", "--max_steps=8", "--workers=1",
          "--disagreement_episodes=0", f"--out={out or os.path.join(d, 'out')}", *extra]


for _name, _extra, _parts in [
    ("unknown_behavior", ["--behavior=expert:0.5,sloppy:0.5"], ["sloppy"]),
    ("negative_weight", ["--behavior=expert:1.5,random:-0.5"], ["-0.5"]),
    ("zero_weights", ["--behavior=expert:0,random:0"], ["weight"]),
    ("bad_weight", ["--behavior=expert:lots"], ["lots"]),
    ("noisy_param_out_of_range", ["--behavior=noisy@2:1"], ["noisy", "2"]),
    ("noisy_param_not_a_number", ["--behavior=noisy@x:1"], ["noisy", "x"]),
    ("param_on_expert", ["--behavior=expert@3:1"], ["expert"]),
    ("behavior_and_noise", ["--behavior=expert:1", "--noise=0.1"], ["--noise", "--behavior"]),
    ("noise_above_one", ["--noise=1.5"], ["noise", "1.5"]),
    ("noise_not_a_number", ["--noise=abc"], ["--noise", "abc"]),
    ("episodes_zero", ["--episodes=0"], ["episodes"]),
    ("episodes_not_a_number", ["--episodes=ten"], ["episodes", "ten"]),
    ("max_steps_zero", ["--max_steps=0"], ["max_steps"]),
    ("workers_zero", ["--workers=0"], ["workers"]),
    ("episodes_per_shard_zero", ["--episodes_per_shard=0"], ["episodes_per_shard"]),
]:
  case("data_tools.generate", *_parts, name=f"generate_{_name}")(
      lambda d, fixtures, _extra=_extra: _generate(d, *_extra))


for _name, _env, _parts in [
    ("unknown_level", "babyai:BabyAI-Nope-v0", ["BabyAI-Nope-v0"]),
    ("unknown_simulator", "atari:pong", ["atari"]),
    ("unknown_metaworld_task", "metaworld:fly-v3", ["fly-v3"]),
    ("strict_on_goto_level", "babyai:BabyAI-GoToLocal-v0:strict", ["strict", "GoToLocal"]),
    ("unknown_env_option", "babyai:BabyAI-PickupLoc-v0:lenient", ["lenient"]),
    ("distractor_on_metaworld", "metaworld:reach-v3", ["distractor"]),
]:
  _extra = ["--behavior=distractor:1"] if _name == "distractor_on_metaworld" else []
  case("data_tools.generate", *_parts, name=f"generate_{_name}")(
      lambda d, fixtures, _env=_env, _extra=_extra: _generate(d, *_extra, env=_env))


@case("data_tools.generate", "out", "notes.txt")
def generate_over_users_folder(d, fixtures):
  os.makedirs(os.path.join(d, "out"))
  with open(os.path.join(d, "out", "notes.txt"), "w") as f:
    f.write("mine")
  return _generate(d, "--overwrite")


@case("data_tools.generate", "File too large", file_size_limit=16_000)
def generate_disk_full(d, fixtures):
  return _generate(d, "--episodes=12", "--image_encoding=png")


@case("data_tools.generate", "a_file")
def generate_out_under_a_file(d, fixtures):
  with open(os.path.join(d, "a_file"), "w") as f:
    f.write("mine")
  return _generate(d, out=os.path.join(d, "a_file", "out"))


# --------------------------------------------------------------------------- #
# data_tools.stats and data_tools.validate: damaged datasets, wrong robots.

def _dataset_cases(entry, tool):
  def args(data, config=BABYAI, *extra):
    return [f"--data={data}", f"--config={config}", *extra]

  def damaged(kind):
    def setup(d, fixtures):
      data = _copy(fixtures, "babyai_data", d, "data")
      for cache in [f for f in os.listdir(data) if f.startswith("qsft_stats")]:
        os.remove(os.path.join(data, cache))   # a fresh pass must read the shards
      shard = _shards(data)[0]
      info = os.path.join(_info_dir(data), "dataset_info.json")
      if kind == "truncated_shard":
        _truncate(shard)
      elif kind == "flipped_shard":
        _flip(shard)
      elif kind == "missing_shard":
        os.remove(shard)
      elif kind == "broken_dataset_info":
        with open(info, "w") as f:
          f.write("{ not json")
      elif kind == "dataset_info_wrong_type":
        with open(info, "w") as f:
          json.dump([1, 2, 3], f)
      elif kind == "features_missing":
        os.remove(os.path.join(_info_dir(data), "features.json"))
      return args(data)
    return setup

  parts = {"truncated_shard": ["tfrecord"], "flipped_shard": ["tfrecord"],
           "missing_shard": ["tfrecord"], "broken_dataset_info": ["dataset_info.json"],
           "dataset_info_wrong_type": ["dataset_info.json"],
           "features_missing": ["features.json"]}
  for kind, p in parts.items():
    case(entry, *p, name=f"{tool}_{kind}")(damaged(kind))

  case(entry, "nowhere", name=f"{tool}_missing_dir")(
      lambda d, fixtures: args(os.path.join(d, "nowhere")))

  def empty_dir(d, fixtures):
    os.makedirs(os.path.join(d, "empty"))
    return args(os.path.join(d, "empty"))
  case(entry, "empty", "not a TFDS dataset", name=f"{tool}_empty_dir")(empty_dir)

  def a_file(d, fixtures):
    with open(os.path.join(d, "a_file"), "w") as f:
      f.write("mine")
    return args(os.path.join(d, "a_file"))
  case(entry, "a_file", name=f"{tool}_data_is_a_file")(a_file)

  def npz_folder(d, fixtures):
    _one_npz(d)
    return args(os.path.join(d, "in"))
  case(entry, "in", "no dataset_info.json", name=f"{tool}_npz_folder")(npz_folder)

  case(entry, "observation/state", "rlds_keys", name=f"{tool}_other_robot")(
      lambda d, fixtures: args(_copy(fixtures, "babyai_data", d, "data"), METAWORLD))
  case(entry, "test", name=f"{tool}_missing_split")(
      lambda d, fixtures: args(_copy(fixtures, "babyai_data", d, "data"), BABYAI,
                               "--split=test"))
  case(entry, "nope.py", name=f"{tool}_missing_config")(
      lambda d, fixtures: args(_copy(fixtures, "babyai_data", d, "data"),
                               os.path.join(REPO, "robot_configs", "nope.py")))


def _info_dir(data):
  """The folder that holds dataset_info.json (the dataset root or its version folder)."""
  for r, _, fs in os.walk(data):
    if "dataset_info.json" in fs:
      return r
  raise FileNotFoundError(f"no dataset_info.json under {data}")


_dataset_cases("data_tools.stats", "stats")
_dataset_cases("data_tools.validate", "validate")


# --------------------------------------------------------------------------- #
# qsft_vla.train: configs, data and workdirs refused before anything is written.

TINY = ["--config.model.rt1_small.width=32", "--config.model.rt1_small.depth=1",
        "--config.model.rt1_small.num_heads=2", "--config.model.rt1_small.tokens_per_image=2",
        "--config.model.rt1_small.conv_channels=(8, 8, 8)", "--config.train.num_steps=2",
        "--config.train.batch_size=8", "--config.eval.every=0"]


def _train(d, data, *extra, config=BABYAI + ":qsft", workdir=None):
  return [f"--config={config}", f"--workdir={workdir or os.path.join(d, 'run')}",
          f"--config.data.dir={data}", *TINY, *extra]


for _name, _extra, _parts in [
    ("unknown_field", ["--config.train.bogus=1"], ["train.bogus"]),
    ("misspelt_learner_field", ["--config.learner.betta=4"], ["learner.betta"]),
    ("unknown_section", ["--config.nope.x=1"], ["nope"]),
    ("negative_beta", ["--config.learner.beta=-1"], ["beta"]),
    ("nan_beta", ["--config.learner.beta=nan"], ["beta"]),
    ("gamma_above_one", ["--config.learner.gamma=1.5"], ["gamma"]),
    ("polyak_above_one", ["--config.learner.polyak_alpha=2"], ["polyak_alpha"]),
    ("unknown_algorithm", ["--config.learner.algorithm=ppo"], ["algorithm", "ppo"]),
    ("nan_learning_rate", ["--config.learner.lr_pi=nan"], ["lr_pi"]),
    ("zero_batch", ["--config.train.batch_size=0"], ["batch_size"]),
    ("batch_larger_than_data", ["--config.train.batch_size=4096"], ["batch_size", "4096"]),
    ("negative_steps", ["--config.train.num_steps=-5"], ["num_steps"]),
    ("value_of_wrong_type", ["--config.train.num_steps=many"], ["num_steps", "many"]),
    ("quantile_above_one", ["--config.learner.filter_quantile=1.5"], ["filter_quantile"]),
    ("unknown_model", ["--config.model.name=gpt9"], ["gpt9"]),
    ("negative_lora_rank", ["--config.learner.lora_rank=-2"], ["lora_rank"]),
    ("lora_targets_not_a_regex", ["--config.learner.lora_rank=4",
                                  "--config.learner.lora_targets=(q_proj"], ["lora_targets"]),
    ("lora_on_a_shared_trunk", ["--config.learner.lora_rank=4",
                                "--config.learner.architecture=shared"],
     ["lora_rank", "separate"]),
    # The default rt1_small learns from scratch: there are no weights to adapt.
    ("lora_without_pretrained_weights", ["--config.learner.lora_rank=4",
                                         "--config.learner.architecture=separate"],
     ["lora_rank", "pretrained"]),
]:
  case("qsft_vla.train", *_parts, name=f"train_{_name}")(
      lambda d, fixtures, _extra=_extra: _train(d, fixtures["babyai_data"], *_extra))


@case("qsft_vla.train", "nowhere")
def train_missing_data(d, fixtures):
  return _train(d, os.path.join(d, "nowhere"))


@case("qsft_vla.train", "in", "data_tools.convert")
def train_data_not_rlds(d, fixtures):
  _one_npz(d)
  return _train(d, os.path.join(d, "in"))


@case("qsft_vla.train", "tfrecord")
def train_truncated_shard(d, fixtures):
  data = _copy(fixtures, "babyai_data", d, "data")
  for cache in [f for f in os.listdir(data) if f.startswith("qsft_stats")]:
    os.remove(os.path.join(data, cache))
  _truncate(_shards(data)[0])
  return _train(d, data)


@case("qsft_vla.train", "observation/state", "rlds_keys")
def train_data_of_another_robot(d, fixtures):
  return _train(d, _copy(fixtures, "babyai_data", d, "data"), config=METAWORLD + ":qsft")


@case("qsft_vla.train", "a_file")
def train_workdir_is_a_file(d, fixtures):
  with open(os.path.join(d, "a_file"), "w") as f:
    f.write("mine")
  return _train(d, fixtures["babyai_data"], workdir=os.path.join(d, "a_file"))


@case("qsft_vla.train", "a_file")
def train_workdir_under_a_file(d, fixtures):
  with open(os.path.join(d, "a_file"), "w") as f:
    f.write("mine")
  return _train(d, fixtures["babyai_data"], workdir=os.path.join(d, "a_file", "run"))


@case("qsft_vla.train", "locked", "not writable", teardown=_writable_again)
def train_workdir_read_only(d, fixtures):
  os.makedirs(os.path.join(d, "locked"))
  _read_only(os.path.join(d, "locked"))
  return _train(d, fixtures["babyai_data"], workdir=os.path.join(d, "locked", "run"))


@case("qsft_vla.train", "nope.py")
def train_missing_config(d, fixtures):
  return _train(d, fixtures["babyai_data"], config=os.path.join(REPO, "robot_configs", "nope.py"))


@case("qsft_vla.train", "nope")
def train_unknown_variant(d, fixtures):
  return _train(d, fixtures["babyai_data"], config=BABYAI + ":nope")


@case("qsft_vla.train", "config.json")
def train_workdir_with_broken_config(d, fixtures):
  os.makedirs(os.path.join(d, "run"))
  with open(os.path.join(d, "run", "config.json"), "w") as f:
    f.write("{ not json")
  return _train(d, fixtures["babyai_data"])


# --------------------------------------------------------------------------- #
# qsft_vla.evaluate: damaged checkpoints, bad flags.

def _evaluate(run, *extra):
  return [f"--workdir={run}", "--episodes=1", "--max_steps=3", "--video_episodes=0",
          "--progress=false", *extra]


def _step_dir(run):
  ck = os.path.join(run, "checkpoints")
  return os.path.join(ck, max(os.listdir(ck), key=lambda s: int(s) if s.isdigit() else -1))


for _name, _extra, _parts in [
    ("zero_episodes", ["--episodes=0"], ["episodes"]),
    ("negative_beta", ["--beta=-1"], ["beta", "-1"]),
    ("nan_beta", ["--beta=nan"], ["beta", "nan"]),
    ("huge_beta", ["--beta=1e39"], ["beta"]),
    ("negative_temperature", ["--temperature=-1"], ["temperature"]),
    ("huge_temperature", ["--temperature=1e39"], ["temperature"]),
    ("missing_step", ["--checkpoint_step=99"], ["99"]),
    ("zero_max_steps", ["--max_steps=0"], ["max_steps"]),
    ("unknown_env", ["--env=babyai:BabyAI-Nope-v0"], ["BabyAI-Nope-v0"]),
    ("env_of_another_robot", ["--env=metaworld:reach-v3"], ["metaworld", "babyai"]),
    ("unknown_extraction", ["--extraction=argmax"], ["extraction", "argmax"]),
]:
  case("qsft_vla.evaluate", *_parts, name=f"evaluate_{_name}")(
      lambda d, fixtures, _extra=_extra: _evaluate(_copy(fixtures, "qsft_run", d, "run"),
                                                   *_extra))


@case("qsft_vla.evaluate", "nowhere")
def evaluate_missing_workdir(d, fixtures):
  return _evaluate(os.path.join(d, "nowhere"))


@case("qsft_vla.evaluate", "run", "checkpoint")
def evaluate_workdir_without_checkpoints(d, fixtures):
  os.makedirs(os.path.join(d, "run"))
  return _evaluate(os.path.join(d, "run"))


@case("qsft_vla.evaluate", "a_file", "not a training workdir")
def evaluate_workdir_is_a_file(d, fixtures):
  with open(os.path.join(d, "a_file"), "w") as f:
    f.write("mine")
  return _evaluate(os.path.join(d, "a_file"))


@case("qsft_vla.evaluate", "run/eval", "cannot write the results", teardown=_writable_again)
def evaluate_read_only_workdir(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  _read_only(run)
  return _evaluate(run)


@case("qsft_vla.evaluate", "damaged", "sha256")
def evaluate_bit_flipped_params(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  _flip(_largest(os.path.join(_step_dir(run), "params_pi")), mask=0x10)
  return _evaluate(run)


@case("qsft_vla.evaluate", "damaged", "bytes")
def evaluate_truncated_params(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  _truncate(_largest(os.path.join(_step_dir(run), "params_pi")), keep=0.9)
  return _evaluate(run)


@case("qsft_vla.evaluate", "metadata")
def evaluate_deleted_metadata(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  os.remove(os.path.join(_step_dir(run), "meta", "metadata"))
  return _evaluate(run)


@case("qsft_vla.evaluate", "skipping a damaged checkpoint", expect="warned",
      may_write=("run/eval",), timeout=240)
def evaluate_falls_back_to_an_intact_step(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  newest = _step_dir(run)
  shutil.copytree(newest, os.path.join(run, "checkpoints", "99"))
  _flip(_largest(os.path.join(run, "checkpoints", "99", "params_pi")), mask=0x10)
  return _evaluate(run)


# --------------------------------------------------------------------------- #
# qsft_vla.serve: refused before it serves (a server that starts would run until
# killed: every case here must be refused).

_HELD_SOCKETS: dict[str, Any] = {}


def _serve(run, *extra):
  return [f"--workdir={run}", "--port=0", *extra]


def _hold_port(d, host):
  """A port someone else listens on for the case's duration (_release_port ends it)."""
  sock = socket.socket()
  sock.bind((host, 0))
  sock.listen()
  _HELD_SOCKETS[d] = sock
  return sock.getsockname()[1]


def _release_port(d):
  sock = _HELD_SOCKETS.pop(d, None)
  if sock is not None:
    sock.close()


@case("qsft_vla.serve", "nowhere")
def serve_missing_workdir(d, fixtures):
  return _serve(os.path.join(d, "nowhere"))


@case("qsft_vla.serve", "token", "empty")
def serve_empty_token_file(d, fixtures):
  token = os.path.join(d, "token")
  with open(token, "w") as f:
    f.write("\n")
  return _serve(_copy(fixtures, "qsft_run", d, "run"), f"--token_file={token}")


@case("qsft_vla.serve", "no_token", "cannot read")
def serve_missing_token_file(d, fixtures):
  return _serve(_copy(fixtures, "qsft_run", d, "run"), f"--token_file={os.path.join(d, 'no_token')}")


@case("qsft_vla.serve", "token", "one word")
def serve_token_with_spaces(d, fixtures):
  token = os.path.join(d, "token")
  with open(token, "w") as f:
    f.write("two words\n")
  return _serve(_copy(fixtures, "qsft_run", d, "run"), f"--token_file={token}")


@case("qsft_vla.serve", "127.0.0.1", "already in use", teardown=_release_port)
def serve_port_in_use(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  return [f"--workdir={run}", f"--port={_hold_port(d, '127.0.0.1')}"]


@case("qsft_vla.serve", "nosuchhost.invalid")
def serve_unknown_host(d, fixtures):
  return _serve(_copy(fixtures, "qsft_run", d, "run"), "--host=nosuchhost.invalid")


@case("qsft_vla.serve", "damaged", "sha256")
def serve_bit_flipped_params(d, fixtures):
  run = _copy(fixtures, "qsft_run", d, "run")
  _flip(_largest(os.path.join(_step_dir(run), "params_pi")), mask=0x10)
  return _serve(run)


for _name, _extra, _parts in [
    ("negative_beta", ["--beta=-1"], ["beta", "-1"]),
    ("nan_beta", ["--beta=nan"], ["beta", "nan"]),
    ("zero_sessions", ["--max_sessions=0"], ["max_sessions"]),
    ("missing_step", ["--checkpoint_step=99"], ["99"]),
]:
  case("qsft_vla.serve", *_parts, name=f"serve_{_name}")(
      lambda d, fixtures, _extra=_extra: _serve(_copy(fixtures, "qsft_run", d, "run"), *_extra))


# --------------------------------------------------------------------------- #
# qsft_vla.replay.server: refused before it serves (as qsft_vla.serve).

for _name, _extra, _parts in [
    ("max_size_zero", ["--config.replay.max_size=0"], ["replay.max_size", "0"]),
    ("min_size_above_max", ["--config.replay.min_size_to_sample=10",
                            "--config.replay.max_size=5"], ["min_size_to_sample", "never"]),
    ("unknown_sampler", ["--config.replay.sampler=lifo"], ["replay.sampler", "lifo"]),
    ("unknown_field", ["--config.replay.bogus=1"], ["replay.bogus"]),
    ("nan_error_buffer", ["--config.replay.error_buffer=nan"], ["error_buffer", "nan"]),
]:
  case("qsft_vla.replay.server", *_parts, name=f"replay_server_{_name}")(
      lambda d, fixtures, _extra=_extra: [f"--config={BABYAI}", "--port=0", *_extra])


@case("qsft_vla.replay.server", "checkpoint_dir", "file")
def replay_server_checkpoint_dir_under_a_file(d, fixtures):
  blocker = os.path.join(d, "file")
  with open(blocker, "w") as f:
    f.write("not a folder")
  return [f"--config={BABYAI}", "--port=0", f"--checkpoint_dir={os.path.join(blocker, 'ckpt')}"]


@case("qsft_vla.replay.server", "--port=", "in use", teardown=_release_port)
def replay_server_port_in_use(d, fixtures):
  return [f"--config={BABYAI}", f"--port={_hold_port(d, '')}"]


# --------------------------------------------------------------------------- #
# qsft_vla.replay.insert: refused before anything is inserted.

def _insert(data, *extra):
  return [f"--config={BABYAI}", f"--data={data}", *extra]


@case("qsft_vla.replay.insert", "nowhere")
def replay_insert_missing_dataset(d, fixtures):
  return _insert(os.path.join(d, "nowhere"), "--server=localhost:1", "--timeout=1")


@case("qsft_vla.replay.insert", "localhost:1", "no replay server answered")
def replay_insert_absent_server(d, fixtures):
  return _insert(_copy(fixtures, "babyai_data", d, "data"), "--server=localhost:1", "--timeout=1")


@case("qsft_vla.replay.insert", "replay.table")
def replay_insert_empty_table_name(d, fixtures):
  return _insert(_copy(fixtures, "babyai_data", d, "data"), "--server=localhost:1",
                 "--config.replay.table= ")


# --------------------------------------------------------------------------- #
# qsft_vla.replay.actor: refused before anything is acted or written.

_ENV = "--env=babyai:BabyAI-GoToLocal-v0"


@case("qsft_vla.replay.actor", "nowhere", "no such run directory")
def replay_actor_missing_run(d, fixtures):
  return [f"--workdir={os.path.join(d, 'nowhere')}", _ENV, "--server=localhost:1"]


@case("qsft_vla.replay.actor", "--epsilon", "[0, 1]")
def replay_actor_bad_epsilon(d, fixtures):
  return [f"--workdir={_copy(fixtures, 'qsft_run', d, 'run')}", _ENV, "--server=localhost:1",
          "--epsilon=1.5"]


@case("qsft_vla.replay.actor", "--env", "unknown", "Nope")
def replay_actor_unknown_env(d, fixtures):
  return [f"--workdir={_copy(fixtures, 'qsft_run', d, 'run')}", "--env=babyai:Nope",
          "--server=localhost:1"]


@case("qsft_vla.replay.actor", "no checkpoint appeared within")
def replay_actor_run_without_checkpoints(d, fixtures):
  os.makedirs(os.path.join(d, "empty_run"))
  return [f"--workdir={os.path.join(d, 'empty_run')}", _ENV, "--server=localhost:1",
          "--wait=0.5"]


@case("qsft_vla.replay.actor", "localhost:1", "no replay server answered")
def replay_actor_absent_server(d, fixtures):
  return [f"--workdir={_copy(fixtures, 'qsft_run', d, 'run')}", _ENV, "--server=localhost:1",
          "--timeout=1"]


# --------------------------------------------------------------------------- #
# The robot-host API: Controller.load, its setters, reset and act.

def _controller(path, **kw):
  from qsft_vla.policy.controller import Controller  # pylint: disable=g-import-not-at-top
  return Controller.load(path, warmup=False, **kw)


def _observation(spec, rng):
  obs = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
         for c in spec.cameras}
  if spec.state_dim:
    obs["state"] = rng.normal(size=spec.state_dim).astype(np.float32)
  return obs


def _api_load(name, damage, parts, **load_kw):
  def setup(d, fixtures):
    run = _copy(fixtures, "qsft_run", d, "run")
    damage(run)
    return lambda: _controller(run, **load_kw)
  case("api", *parts, name=f"controller_load_{name}")(setup)


def _edit_meta(run, edit):
  path = os.path.join(_step_dir(run), "meta", "metadata")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(edit(text))


for _name, _damage, _parts, _kw in [
    ("missing", lambda run: shutil.rmtree(run), ["run"], {}),
    ("no_checkpoints", lambda run: shutil.rmtree(os.path.join(run, "checkpoints")),
     ["run", "checkpoint"], {}),
    ("bit_flip", lambda run: _flip(_largest(os.path.join(_step_dir(run), "params_pi")),
                                   mask=0x10), ["params_pi", "sha256"], {}),
    ("truncated", lambda run: _truncate(_largest(os.path.join(_step_dir(run), "params_p")),
                                        keep=0.9), ["params_p", "bytes"], {}),
    ("edited_meta", lambda run: _edit_meta(run, lambda t: t.replace('"qsft"', '"qsfT"')),
     ["metadata", "sha256"], {}),
    ("other_robot", lambda run: None, ["metaworld", "dimension"], {"robot": METAWORLD}),
    ("missing_robot_config", lambda run: None, ["nope.py"],
     {"robot": os.path.join(REPO, "robot_configs", "nope.py")}),
    ("negative_beta", lambda run: None, ["beta", "-1"], {"beta": -1.0}),
    ("unknown_extraction", lambda run: None, ["extraction", "argmax"],
     {"extraction": "argmax"}),
]:
  _api_load(_name, _damage, _parts, **_kw)


def _api_run(name, parts, use):
  def setup(d, fixtures):
    run = fixtures["qsft_run"]  # read only: no copy

    def call():
      ctrl = _controller(run)
      use(ctrl, np.random.default_rng(0))
    return call
  case("api", *parts, name=f"controller_{name}")(setup)


def _set(attr, value):
  return lambda ctrl, rng: setattr(ctrl, attr, value)


def _act(obs_fn, instruction="go to the red ball"):
  def use(ctrl, rng):
    ctrl.reset(instruction)
    ctrl.act(obs_fn(_observation(ctrl.spec, rng)))
  return use


def _with(key, value):
  def edit(obs):
    obs[key] = value
    return obs
  return edit


for _name, _parts, _use in [
    ("beta_overflows_float32", ["beta", "1e+39"], _set("beta", 1e39)),
    ("beta_negative", ["beta", "-1"], _set("beta", -1.0)),
    ("beta_nan", ["beta", "nan"], _set("beta", float("nan"))),
    ("beta_string", ["beta", "high"], _set("beta", "high")),
    ("temperature_overflows", ["temperature", "1e+39"], _set("temperature", 1e39)),
    ("temperature_subnormal", ["temperature", "1e-45"], _set("temperature", 1e-45)),
    ("temperature_negative", ["temperature", "-1"], _set("temperature", -1.0)),
    ("reset_none", ["instruction", "str"], lambda ctrl, rng: ctrl.reset(None)),
    ("reset_not_a_string", ["instruction", "int"], lambda ctrl, rng: ctrl.reset(7)),
    ("reset_blank", ["instruction", "letter"], lambda ctrl, rng: ctrl.reset("  \t ")),
    ("reset_zero_width", ["instruction", "letter"],
     lambda ctrl, rng: ctrl.reset("\u200b\u200d\ufeff")),
    ("reset_lone_surrogate", ["instruction", "Unicode"],
     lambda ctrl, rng: ctrl.reset("go to \ud800")),
    ("act_before_reset", ["reset"], lambda ctrl, rng: ctrl.act(_observation(ctrl.spec, rng))),
    ("act_not_a_dict", ["observation", "dict"], _act(lambda obs: list(obs.values()))),
    ("act_missing_camera", ["image", "missing"], _act(lambda obs: {})),
    ("act_extra_key", ["depth"], _act(_with("depth", np.zeros((4, 4))))),
    ("act_image_shape", ["image", "shape"], _act(_with("image", np.zeros((5, 5, 3), np.uint8)))),
    ("act_image_nan", ["image"], _act(_with("image", np.full((56, 56, 3), np.nan, np.float32)))),
    ("act_image_string", ["image"], _act(_with("image", "a picture"))),
]:
  _api_run(_name, _parts, _use)
