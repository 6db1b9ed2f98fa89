"""data_tools.convert --format=lerobot: a LeRobotDataset (v3.0: parquet + MP4) to our RLDS.

The fixtures are written here in LeRobot's v3.0 layout (meta/info.json, tasks and
episode metadata as parquet, frames in data/chunk-*/file-*.parquet, one MP4 per
camera holding several episodes, episodes split over two files), so frames,
actions, instructions and episode boundaries are checked against what was written.
"""

import json
import os

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from data_tools import convert
from qsft_vla import config as qconfig, robot, train
from qsft_vla.data import rlds_reader
from qsft_vla.data.episode import DataError

FPS = 10
CAM = "observation.images.top"
LENGTHS = (5, 4, 6)           # episodes 0, 1 in file 0; episode 2 in file 1
FILES = ((0, 1), (2,))
TASKS = ("push the puck to the goal", "open the drawer")
CODEC = "libsvtav1" if "libsvtav1" in av.codecs_available else "libx264"  # LeRobot's default first


def _frame(global_index: int) -> np.ndarray:
  """A flat colour per frame, far apart from its neighbours, so order survives lossy coding."""
  img = np.empty((64, 64, 3), np.uint8)
  img[..., 0] = (37 * global_index) % 200 + 20
  img[..., 1] = (91 * global_index) % 200 + 20
  img[..., 2] = 128
  return img


def _write_video(path, frames):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w") as out:
    stream = out.add_stream(CODEC, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    for img in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def write_lerobot(root, video=True):
  """A 3-episode LeRobotDataset v3.0 at `root` (camera as "video" or "image" feature)."""
  rng = np.random.default_rng(0)
  episodes, truth, index = [], [], 0
  for file_index, eps in enumerate(FILES):
    rows = {k: [] for k in ("index", "episode_index", "frame_index", "timestamp", "task_index",
                            "action", "observation.state", "next.reward", "next.done")}
    if not video:
      rows[CAM] = []
    frames, start = [], 0.0
    for e in eps:
      n, task = LENGTHS[e], e % 2
      action = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
      state = rng.standard_normal((n, 39)).astype(np.float32)
      reward = np.zeros(n, np.float32)
      reward[-1] = float(e != 1)  # episodes 0 and 2 succeed
      imgs = [_frame(index + t) for t in range(n)]
      truth.append({"action": action, "state": state, "reward": reward, "images": imgs,
                    "task": TASKS[task]})
      for t in range(n):
        rows["index"].append(index + t)
        rows["episode_index"].append(e)
        rows["frame_index"].append(t)
        rows["timestamp"].append(np.float32(t / FPS))
        rows["task_index"].append(task)
        rows["action"].append(action[t].tolist())
        rows["observation.state"].append(state[t].tolist())
        rows["next.reward"].append(float(reward[t]))
        rows["next.done"].append(t == n - 1)
        if not video:
          from PIL import Image  # pylint: disable=g-import-not-at-top
          import io  # pylint: disable=g-import-not-at-top
          buf = io.BytesIO()
          Image.fromarray(imgs[t]).save(buf, format="PNG")
          rows[CAM].append({"bytes": buf.getvalue(), "path": f"frame_{index + t:06d}.png"})
      ep = {"episode_index": e, "tasks": [TASKS[task]], "length": n,
            "data/chunk_index": 0, "data/file_index": file_index,
            "dataset_from_index": index, "dataset_to_index": index + n,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
      if video:
        ep.update({f"videos/{CAM}/chunk_index": 0, f"videos/{CAM}/file_index": file_index,
                   f"videos/{CAM}/from_timestamp": start,
                   f"videos/{CAM}/to_timestamp": start + n / FPS})
      episodes.append(ep)
      frames += imgs
      start += n / FPS
      index += n
    path = os.path.join(root, f"data/chunk-000/file-{file_index:03d}.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({k: v for k, v in rows.items()}), path)
    if video:
      _write_video(os.path.join(root, f"videos/{CAM}/chunk-000/file-{file_index:03d}.mp4"), frames)
  os.makedirs(os.path.join(root, "meta/episodes/chunk-000"))
  pq.write_table(pa.Table.from_pylist(episodes),
                 os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"))
  pq.write_table(pa.table({"task_index": list(range(len(TASKS))), "__index_level_0__": TASKS}),
                 os.path.join(root, "meta/tasks.parquet"))
  camera = {"dtype": "video" if video else "image", "shape": [64, 64, 3],
            "names": ["height", "width", "channels"]}
  info = {
      "codebase_version": "v3.0", "robot_type": "sawyer", "fps": FPS,
      "total_episodes": len(LENGTHS), "total_frames": index, "total_tasks": len(TASKS),
      "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
      "splits": {"train": f"0:{len(LENGTHS)}"},
      "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
      "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
      "features": {
          CAM: camera,
          "observation.state": {"dtype": "float32", "shape": [39], "names": None},
          "action": {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "gripper"]},
          "next.reward": {"dtype": "float32", "shape": [1], "names": None},
          "next.done": {"dtype": "bool", "shape": [1], "names": None},
          **{k: {"dtype": d, "shape": [1], "names": None} for k, d in (
              ("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
              ("index", "int64"), ("task_index", "int64"))},
      },
  }
  with open(os.path.join(root, "meta/info.json"), "w") as f:
    json.dump(info, f, indent=2)
  return str(root), truth


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
