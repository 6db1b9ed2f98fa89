"""data_tools.validate: good converted data passes, bad RLDS data is named precisely."""

import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_tools import convert as convert_lib
from data_tools import validate as validate_lib
from qsft_vla.config import load_config_file
from qsft_vla.data import rlds_writer
from qsft_vla.data.episode import DataError
from qsft_vla.robot import RobotSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
METAWORLD = str(ROOT / "robot_configs" / "metaworld.py")


def spec_of(path):
  return RobotSpec.from_config(load_config_file(path).robot)


def episode(rng, length, action_dim=4, state_dim=39, size=64):
  steps = {"observation": {"image": rng.integers(0, 256, (length, size, size, 3), np.uint8)},
           "action": rng.uniform(-1, 1, (length, action_dim)).astype(np.float32),
           "reward": np.zeros(length, np.float32), "discount": np.ones(length, np.float32),
           "is_first": np.arange(length) == 0, "is_last": np.arange(length) == length - 1,
           "is_terminal": np.zeros(max(length, 1), bool),
           "language_instruction": ["reach"] * length}
  if state_dim:
    steps["observation"]["state"] = np.zeros((length, state_dim), np.float32)
  return {"steps": steps, "episode_metadata": {"success": False}}


def write_unchecked(out, spec, episodes, monkeypatch):
  """Writes episodes as they are: the writer's check is bypassed to make bad datasets."""
  with monkeypatch.context() as m:
    m.setattr(rlds_writer, "check_episode",
              lambda ep, spec, where, **kw: {"length": len(ep["steps"]["action"])})
    with rlds_writer.RLDSWriter(str(out), spec, name="bad") as w:
      for ep in episodes:
        w.add(ep)


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
  """A converted metaworld dataset with one action outside the bounds (clip policy)."""
  tmp = tmp_path_factory.mktemp("good")
  rng = np.random.default_rng(0)
  for i, length in enumerate([4, 5]):
    action = rng.uniform(-1, 1, (length, 4)).astype(np.float32)
    if i == 1:
      action[3, 2] = 1.5
    np.savez(tmp / f"ep{i}.npz", image=rng.integers(0, 256, (length, 64, 64, 3), np.uint8),
             action=action, state=rng.normal(size=(length, 39)),
             language_instruction=np.array("reach"))
  convert_lib.convert(str(tmp), "npz", spec_of(METAWORLD), str(tmp / "ds"), progress=False)
  return tmp / "ds"


def test_good_dataset_valid_with_clip_warning(good_dataset):
  report = validate_lib.validate(str(good_dataset), spec_of(METAWORLD))
  assert report["num_episodes"] == 2 and report["num_steps"] == 9
  assert report["out_of_bounds"] == {"dx": 0, "dy": 0, "dz": 1, "gripper": 0}
  assert report["first_out_of_bounds"] == (1, 3, "dz")
  assert len(report["warnings"]) == 1 and "episode 1, step 3" in report["warnings"][0]
  # The same data under a "reject" policy is invalid, named precisely.
  with pytest.raises(DataError, match=r"episode 1, step 3, key 'action'.*outside"):
    validate_lib.validate(str(good_dataset), spec_of(METAWORLD), out_of_bounds="reject")


def test_bad_datasets_named(tmp_path, monkeypatch):
  spec = spec_of(METAWORLD)
  rng = np.random.default_rng(1)
  nan_ep = episode(rng, 5)
  nan_ep["steps"]["action"][2, 1] = np.nan
  last_ep = episode(rng, 4)
  last_ep["steps"]["is_last"] = np.array([False, True, False, False])
  cases = {
      "nan": ([episode(rng, 3), nan_ep], r"episode 1, step 2, key 'action': non-finite"),
      "is_last": ([last_ep], r"episode 0, step 3, key 'is_last': is_last must be True"),
      "empty": ([episode(rng, 2), episode(rng, 0)], r"episode 1, key 'steps': empty episode"),
  }
  for name, (episodes, pattern) in cases.items():
    write_unchecked(tmp_path / name, spec, episodes, monkeypatch)
    with pytest.raises(DataError, match=pattern):
      validate_lib.validate(str(tmp_path / name), spec)


def test_declared_features_and_keys_checked_before_reading(good_dataset, tmp_path):
  spec = spec_of(METAWORLD)
  cfg = load_config_file(METAWORLD)
  cfg.robot.cameras = {"image": {"height": 96, "width": 96}}
  with pytest.raises(DataError, match=r"key 'observation/image'.*expects shape \(96, 96, 3\)"):
    validate_lib.validate(str(good_dataset), RobotSpec.from_config(cfg.robot))
  cfg = load_config_file(METAWORLD)
  cfg.robot.action.names = ("dx", "dy", "dz")
  cfg.robot.action.dims = {n: cfg.robot.action.dims[n] for n in ("dx", "dy", "dz")}
  with pytest.raises(DataError, match=r"key 'action'.*shape \(4,\).*expects shape \(3,\)"):
    validate_lib.validate(str(good_dataset), RobotSpec.from_config(cfg.robot))
  keys = dict(spec.rlds_keys, action="act")
  with pytest.raises(DataError, match=r"no 'act'"):
    validate_lib.validate(str(good_dataset), dataclasses.replace(spec, rlds_keys=keys))
  with pytest.raises(DataError, match="no split 'test'"):
    validate_lib.validate(str(good_dataset), spec, split="test")
  with pytest.raises(DataError, match="not a TFDS dataset"):
    validate_lib.validate(str(tmp_path), spec)


def test_binary_exit_status(good_dataset, tmp_path, monkeypatch):
  bad = episode(np.random.default_rng(2), 3)
  bad["steps"]["observation"]["state"][1, 5] = np.inf
  write_unchecked(tmp_path / "bad", spec_of(METAWORLD), [bad], monkeypatch)
  py = sys.executable
  script = (f"{py} -m data_tools.validate --data={good_dataset} --config={METAWORLD}; "
            f"echo rc=$?; {py} -m data_tools.validate --data={tmp_path / 'bad'} "
            f"--config={METAWORLD}; echo rc=$?")
  r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT,
                     timeout=120)
  out = r.stdout + r.stderr
  assert "valid:" in r.stdout and "2 episodes, 9 steps" in r.stdout, out
  assert "warning: 1 action value(s) outside the bounds" in r.stdout, out
  assert r.stdout.count("rc=") == 2, out
  assert r.stdout.index("rc=0") < r.stdout.index("rc=1"), out
  assert "episode 0, step 1, key 'observation/state': non-finite" in r.stderr, out
