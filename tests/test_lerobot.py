"""data_tools.convert --format=lerobot: a LeRobotDataset (v3.0: parquet + MP4) to our RLDS.

The fixtures are written here in LeRobot's v3.0 layout (meta/info.json, tasks and
episode metadata as parquet, frames in data/chunk-*/file-*.parquet, one MP4 per
camera holding several episodes, episodes split over two files), so frames,
actions, instructions and episode boundaries are checked against what was written.
"""

import json
import os

import numpy as np
import pytest

from conftest import REPO
from data_tools import convert
from qsft_vla import config as qconfig, robot, train
from qsft_vla.data import rlds_reader
from qsft_vla.data.episode import DataError
from lerobot_fixture import CAM, LENGTHS, write_lerobot

def _spec():
  return robot.RobotSpec.from_config(qconfig.load_config_file(
      os.path.join(REPO, "robot_configs", "metaworld.py")).robot)


@pytest.mark.parametrize("video", [True, False], ids=["mp4", "png_in_parquet"])
def test_frames_actions_tasks_and_episode_boundaries(tmp_path, video):
  root, truth = write_lerobot(tmp_path / "lerobot", video=video)
  out = str(tmp_path / "rlds")
  summary = convert.convert(root, "lerobot", _spec(), out, {"image": CAM}, progress=False)
  assert summary["episodes"] == 3 and summary["steps"] == sum(LENGTHS)
  assert summary["success_episodes"] == 2  # the last reward is positive in episodes 0 and 2
  episodes = [ep for _, ep in rlds_reader.iterate_episodes(out, _spec())]
  assert [len(ep["steps"]["action"]) for ep in episodes] == list(LENGTHS)
  for ep, want in zip(episodes, truth):
    s = ep["steps"]
    np.testing.assert_array_equal(s["action"], want["action"])
    np.testing.assert_array_equal(s["observation"]["state"], want["state"])
    np.testing.assert_array_equal(s["reward"], want["reward"])
    assert s["language_instruction"] == [want["task"]] * len(want["action"])
    images = s["observation"]["image"].astype(np.int16)
    expected = np.stack(want["images"]).astype(np.int16)
    if video:  # lossy: every frame is its own within a few grey levels, never a neighbour's
      assert np.abs(images - expected).mean(axis=(1, 2, 3)).max() < 6
    else:
      np.testing.assert_array_equal(images, expected)
    assert bool(s["is_terminal"][-1]) == bool(want["reward"][-1] > 0)


def test_damaged_datasets_are_refused_naming_what(tmp_path):
  root, _ = write_lerobot(tmp_path / "lerobot")
  os.remove(os.path.join(root, f"videos/{CAM}/chunk-000/file-001.mp4"))
  with pytest.raises(DataError, match="video file missing.*file-001.mp4"):
    convert.convert(root, "lerobot", _spec(), str(tmp_path / "a"), {"image": CAM},
                    progress=False)
  assert not os.path.exists(tmp_path / "a")
  info_path = os.path.join(root, "meta/info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["codebase_version"] = "v2.1"
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(DataError, match="only the v3.x layout"):
    convert.convert(root, "lerobot", _spec(), str(tmp_path / "b"), {"image": CAM},
                    progress=False)
  with pytest.raises(DataError, match="missing.*needed for image"):
    root2, _ = write_lerobot(tmp_path / "lerobot2")
    convert.convert(root2, "lerobot", _spec(), str(tmp_path / "c"), progress=False)


@pytest.mark.slow
def test_two_training_steps_from_a_converted_lerobot_dataset(tmp_path):
  root, _ = write_lerobot(tmp_path / "lerobot")
  out = str(tmp_path / "rlds")
  convert.convert(root, "lerobot", _spec(), out, {"image": CAM}, progress=False)
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", "metaworld.py"))
  cfg.data.dir = out
  cfg.data.shuffle_buffer = 16
  cfg.model.rt1_small.update(width=32, depth=1, num_heads=2, conv_channels=(8, 16, 16),
                             tokens_per_image=2, text_dim=16)
  cfg.train.update(num_steps=2, batch_size=4, checkpoint_every=2, log_every=1)
  cfg.eval.every = 0
  summary = train.train(cfg, str(tmp_path / "run"))
  assert summary["step"] == 2 and np.isfinite(summary["loss_pi"])
