"""data_tools.convert: npz/HDF5 round trips, key mapping, overwrite. (Refused inputs, through the
binary: tests/bad_inputs/cases.py.)"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data_tools import convert as convert_lib
from qsft_vla.config import ConfigError, load_config_file
from qsft_vla.data import rlds_reader, statistics
from qsft_vla.data.episode import DataError
from qsft_vla.robot import RobotSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
BABYAI = str(ROOT / "robot_configs" / "babyai.py")
METAWORLD = str(ROOT / "robot_configs" / "metaworld.py")


def spec_of(path):
  return RobotSpec.from_config(load_config_file(path).robot)


def babyai_episode(rng, length, instruction="go to the red ball"):
  return {"image": rng.integers(0, 256, (length, 56, 56, 3), dtype=np.uint8),
          "action": rng.integers(0, 7, (length,)),          # int64 ids, shape (T,)
          "language_instruction": np.array(instruction)}


def metaworld_episode(rng, length):
  return {"image": rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8),
          "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32),
          "state": rng.normal(size=(length, 39)).astype(np.float32),
          "reward": np.zeros(length, np.float32),
          "language_instruction": np.array("reach the goal")}


def save_npz(folder, name, **arrays):
  os.makedirs(folder, exist_ok=True)
  np.savez(os.path.join(folder, name), **arrays)


def read_back(out, spec):
  return [ep for _, ep in rlds_reader.iterate_episodes(str(out), spec)]


def assert_nothing_written(tmp_path, keep=("in",)):
  assert sorted(os.listdir(tmp_path)) == sorted(keep), os.listdir(tmp_path)


def test_npz_round_trip_babyai(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  src = tmp_path / "in"
  ep0 = babyai_episode(rng, 5)
  ep0["reward"] = np.array([0, 0, 0, 0, 1], np.float64)       # auto: terminal, success
  ep1 = babyai_episode(rng, 7)                                   # no reward: truncated
  ep1["language_instruction"] = np.array([f"step {t}" for t in range(7)])  # one per step
  ep2 = babyai_episode(rng, 6)
  ep2["language_instruction"] = np.array(b"open the door")      # bytes scalar
  ep2["is_terminal"] = np.array([0, 0, 0, 0, 0, 1], np.int8)    # terminal, reward 0: failure
  # Sorted file order decides episode order, not creation order.
  save_npz(src, "ep_b.npz", **ep1)
  save_npz(src, "ep_a.npz", **ep0)
  save_npz(src, "ep_c.npz", **ep2)
  spec = spec_of(BABYAI)
  out = tmp_path / "out"

  summary = convert_lib.convert(str(src), "npz", spec, str(out), progress=False)

  assert summary["episodes"] == 3 and summary["steps"] == 18
  assert summary["bytes"] > 0 and summary["out_of_bounds"] == {}
  assert "action: int64 -> float32" in summary["casts"]
  assert "reward: float64 -> float32" in summary["casts"]
  assert summary["terminal_episodes"] == 2 and summary["success_episodes"] == 1
  eps = read_back(out, spec)
  want = [ep0, ep1, ep2]
  for got, w, stem in zip(eps, want, ["ep_a", "ep_b", "ep_c"]):
    s, n = got["steps"], len(w["action"])
    np.testing.assert_array_equal(s["observation"]["image"], w["image"])
    np.testing.assert_array_equal(s["action"], w["action"][:, None].astype(np.float32))
    assert s["action"].dtype == np.float32
    np.testing.assert_array_equal(s["reward"], w.get("reward", np.zeros(n)).astype(np.float32))
    np.testing.assert_array_equal(s["is_first"], np.arange(n) == 0)
    np.testing.assert_array_equal(s["is_last"], np.arange(n) == n - 1)
    np.testing.assert_array_equal(s["discount"], np.ones(n, np.float32))
    md = got["episode_metadata"]
    assert md["episode_id"] == stem and md["noise"] == -1.0
    assert md["source"] == str(src / f"{stem}.npz")
  assert eps[0]["steps"]["language_instruction"] == ["go to the red ball"] * 5
  assert eps[1]["steps"]["language_instruction"] == [f"step {t}" for t in range(7)]
  assert eps[2]["steps"]["language_instruction"] == ["open the door"] * 6
  assert [e["steps"]["is_terminal"].tolist() for e in eps] == [
      [False] * 4 + [True], [False] * 7, [False] * 5 + [True]]
  assert [e["episode_metadata"]["success"] for e in eps] == [True, False, False]

  # Statistics were cached while converting: a cache hit, equal to a fresh pass.
  cached = json.loads((out / statistics.STATS_FILE).read_text())
  fresh = statistics.compute(str(out), spec)
  assert fresh == cached
  monkeypatch.setattr(statistics, "compute", lambda *a, **k: pytest.fail("not cached"))
  assert statistics.load_or_compute(str(out), spec) == cached
  assert cached["success_rate"] == pytest.approx(1 / 3)
  assert cached["terminal_rate"] == pytest.approx(2 / 3)


def test_overwrite_replaces_only_our_own_dataset(tmp_path):
  """--overwrite never deletes the input, a folder holding it, or a folder of the
  user's files; it replaces an earlier dataset of ours, and nothing else changes."""
  rng = np.random.default_rng(1)
  src = tmp_path / "in"
  save_npz(src, "ep.npz", **babyai_episode(rng, 4))
  spec = spec_of(BABYAI)
  snapshot = lambda p: sorted((q.relative_to(p), q.read_bytes()) for q in p.rglob("*")
                              if q.is_file())
  before = snapshot(tmp_path)
  for out, match in [(src, "holds the input"), (tmp_path, "holds the input"),
                     (src / "ep.npz", "not a dataset directory")]:
    with pytest.raises(FileExistsError, match=match):
      convert_lib.convert(str(src), "npz", spec, str(out), overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
  user = tmp_path / "user"
  user.mkdir()
  (user / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="notes.txt"):
    convert_lib.convert(str(src), "npz", spec, str(user), overwrite=True, progress=False)
  assert (user / "notes.txt").read_text() == "mine"
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(FileExistsError, match="not a dataset directory"):
    convert_lib.convert(str(src), "npz", spec, str(a_file), overwrite=True, progress=False)
  # Our own dataset (with its statistics cache) is replaced, only once complete.
  out = tmp_path / "out"
  convert_lib.convert(str(src), "npz", spec, str(out), progress=False)
  save_npz(src, "ep2.npz", **babyai_episode(rng, 3))
  summary = convert_lib.convert(str(src), "npz", spec, str(out), overwrite=True, progress=False)
  assert summary["episodes"] == 2 and len(read_back(out, spec)) == 2
  assert sorted(os.listdir(tmp_path)) == ["a_file", "in", "out", "user"]
  (out / "extra.txt").write_text("added by the user")
  with pytest.raises(FileExistsError, match="extra.txt"):
    convert_lib.convert(str(src), "npz", spec, str(out), overwrite=True, progress=False)
  assert (out / "extra.txt").exists() and len(read_back(out, spec)) == 2


def test_hdf5_key_mapping_state_and_clip_counts(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "in" / "demos.hdf5"
  path.parent.mkdir()
  eps = {}
  with h5py.File(path, "w") as f:
    root = f.create_group("data")
    for name, length in [("demo_1", 6), ("demo_0", 5)]:
      g = root.create_group(name)
      ep = metaworld_episode(rng, length)
      ep["action"] = ep["action"].astype(np.float64)
      ep["reward"] = np.linspace(0, 1, length)
      g["rgb"] = ep["image"]
      g["actions"] = ep["action"]
      g.create_group("obs")["state"] = ep["state"]
      g["reward"] = ep["reward"]
      eps[name] = ep
    # demo_1: one instruction per step (HDF5 strings) and an explicit `terminal`.
    instr = [f"push {t}" for t in range(6)]
    root["demo_1"]["language_instruction"] = np.array(instr, dtype=h5py.string_dtype())
    root["demo_1"].attrs["terminal"] = False
    root["demo_0"].attrs["language_instruction"] = "reach the goal"   # an attribute
    root["demo_0"]["actions"][2, 1] = 1.5                                # out of bounds
    eps["demo_0"]["action"][2, 1] = 1.5
  spec = spec_of(METAWORLD)   # out_of_bounds="clip": counted, stored as given
  out = tmp_path / "out"
  keys = convert_lib.parse_keys("image=rgb, action=actions,state=obs/state")

  summary = convert_lib.convert(str(path.parent), "hdf5", spec, str(out), keys,
                                hdf5_root="data", progress=False)

  assert summary["episodes"] == 2 and summary["out_of_bounds"] == {"dy": 1}
  assert "actions: float64 -> float32" in summary["casts"]
  got = read_back(out, spec)
  assert [e["episode_metadata"]["episode_id"] for e in got] == ["demos/demo_0", "demos/demo_1"]
  for e, name in zip(got, ["demo_0", "demo_1"]):
    w = eps[name]
    np.testing.assert_array_equal(e["steps"]["observation"]["image"], w["image"])
    np.testing.assert_array_equal(e["steps"]["observation"]["state"], w["state"])
    np.testing.assert_array_equal(e["steps"]["action"], w["action"].astype(np.float32))
    np.testing.assert_array_equal(e["steps"]["reward"], w["reward"].astype(np.float32))
  assert got[0]["steps"]["language_instruction"] == ["reach the goal"] * 5
  assert got[1]["steps"]["language_instruction"] == [f"push {t}" for t in range(6)]
  # demo_0: auto rule, last reward 1 > 0 -> terminal; demo_1: its `terminal` attribute says no.
  assert got[0]["steps"]["is_terminal"][-1] and not got[1]["steps"]["is_terminal"].any()
  assert got[0]["episode_metadata"]["success"] and not got[1]["episode_metadata"]["success"]


def test_fixed_instruction_resize_and_terminal_flag(tmp_path):
  cfg = load_config_file(BABYAI)
  cfg.robot.instruction.source = "fixed"
  cfg.robot.instruction.text = "pick up the key"
  spec = RobotSpec.from_config(cfg.robot)
  rng = np.random.default_rng(2)
  ep = {"image": rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
        "action": np.array([0, 1, 2, 6]), "reward": np.array([0, 0, 0, 1.0])}
  save_npz(tmp_path / "in", "e.npz", **ep)
  summary = convert_lib.convert(str(tmp_path / "in"), "npz", spec, str(tmp_path / "out"),
                                terminal="false", resize=True, progress=False)
  assert summary["resized_episodes"] == 1
  assert summary["terminal_episodes"] == 0 and summary["success_episodes"] == 0
  prov = json.loads((tmp_path / "out" / "qsft_provenance.json").read_text())
  assert prov["provenance"]["terminal"] == "false"
  stats = json.loads((tmp_path / "out" / statistics.STATS_FILE).read_text())
  assert stats["terminal_rate"] == 0.0 and stats["num_steps"] == 4


def test_bad_arguments_refused_before_writing(tmp_path):
  spec = spec_of(BABYAI)
  save_npz(tmp_path / "in", "a.npz", **babyai_episode(np.random.default_rng(5), 3))
  with pytest.raises(ValueError, match="unknown name"):
    convert_lib.convert(str(tmp_path / "in"), "npz", spec, str(tmp_path / "out"),
                        {"rgb": "image"}, progress=False)
  with pytest.raises(ValueError, match="name=source"):
    convert_lib.parse_keys("image:rgb")
  with pytest.raises(ValueError, match="twice"):
    convert_lib.parse_keys("image=a,image=b")
  with pytest.raises(DataError, match="no .npz files"):
    convert_lib.convert(str(tmp_path), "npz", spec, str(tmp_path / "out"), progress=False)
  odd = dataclasses.replace(spec, rlds_keys=dict(spec.rlds_keys, action="act"))
  with pytest.raises(ConfigError, match="rlds_keys"):
    convert_lib.convert(str(tmp_path / "in"), "npz", odd, str(tmp_path / "out"), progress=False)
  assert_nothing_written(tmp_path)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    convert_lib.convert(str(tmp_path / "in"), "npz", spec, str(tmp_path / "out"), progress=False)
  assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_binary_converts(tmp_path):
  save_npz(tmp_path / "in", "a.npz", **babyai_episode(np.random.default_rng(6), 4))
  r = subprocess.run(
      [sys.executable, "-m", "data_tools.convert", f"--input={tmp_path / 'in'}", "--format=npz",
       f"--config={BABYAI}:qsft", f"--out={tmp_path / 'out'}", "--keys=image=image"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "episodes 1, steps 4" in r.stdout and "cast action: int64 -> float32" in r.stdout
  assert (tmp_path / "out" / statistics.STATS_FILE).exists()
