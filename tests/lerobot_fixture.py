"""A LeRobotDataset in the v3.0 layout, written here for tests (no lerobot import).

meta/info.json, tasks and episode metadata as parquet, frames in
data/chunk-000/file-00{0,1}.parquet (episodes 0, 1 in the first file, 2 in the
second), and the camera as MP4 (one file per data file, several episodes each,
LeRobot's default AV1 codec where PyAV has it) or as PNG images in the parquet.
"""

import io
import json
import os

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
  from PIL import Image  # pylint: disable=g-import-not-at-top
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
