"""Reads a LeRobotDataset (v3.0 layout: parquet + MP4) episode by episode, for data_tools.convert.

The layout, as LeRobot writes it (and as published on the Hugging Face hub):

  meta/info.json           codebase_version "v3.x", fps, features {key: {dtype, shape}},
                           data_path / video_path templates ("data/chunk-{chunk_index:03d}/...")
  meta/tasks.parquet       task string (the pandas index, or a "task" column) -> task_index
  meta/episodes/chunk-*/file-*.parquet
                           one row per episode: episode_index, length, data/chunk_index,
                           data/file_index, dataset_from_index, dataset_to_index, and per video
                           key videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}
  data/chunk-*/file-*.parquet
                           one row per frame: index, episode_index, frame_index, timestamp,
                           task_index, and the features (action, observation.state,
                           next.reward, ...; fixed-size lists of numbers); "image" features are
                           structs {bytes (PNG/JPEG), path}
  videos/<key>/chunk-*/file-*.mp4
                           the frames of "video" features; several episodes per file, episode e
                           from its from_timestamp on

Each episode is a convert._Source: key -> array with a leading T axis. Keys are the
dataset's own feature names ("action", "observation.state", "observation.images.top",
"next.reward", ...), plus "task": the task string of every frame. A video frame is
the decoded frame whose presentation time is within a quarter of a frame period of
from_timestamp + the row's timestamp; a missing one is an error naming the file and
the time. Written from LeRobot's published v3.0 format (no lerobot import: the
package does not install beside our pins).
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import Any, Iterator

import numpy as np

from qsft_vla.data.episode import DataError

INFO = "meta/info.json"
TASKS = "meta/tasks.parquet"
EPISODES_GLOB = "meta/episodes/chunk-*/file-*.parquet"
TASK_KEY = "task"
_BOOKKEEPING = ("index", "episode_index", "frame_index", "timestamp", "task_index")


def _read_table(path: str, where: str):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise DataError(path, f"missing ({where})")
  try:
    return pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except  (ArrowInvalid, OSError, ...)
    raise DataError(path, f"cannot read as parquet: {type(e).__name__}: {e}") from None


def read_info(root: str) -> dict[str, Any]:
  path = os.path.join(root, INFO)
  if not os.path.isdir(root):
    raise DataError(root, "not a folder (a LeRobotDataset is a folder with meta/info.json)")
  if not os.path.isfile(path):
    raise DataError(root, "not a LeRobotDataset: no meta/info.json")
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(path, f"unreadable: {e}") from None
  version = str(info.get("codebase_version", ""))
  if not version.startswith("v3."):
    raise DataError(path, f"codebase_version {version or 'missing'!r}: only the v3.x layout is "
                    "read (convert older datasets with lerobot's v2.1 -> v3.0 converter first)")
  for field in ("fps", "features", "data_path"):
    if field not in info:
      raise DataError(path, f"has no {field!r}")
  return info


def _tasks(root: str) -> dict[int, str]:
  table = _read_table(os.path.join(root, TASKS), "the task strings")
  cols = table.column_names
  text = next((c for c in ("task", "__index_level_0__") if c in cols), None)
  if text is None or "task_index" not in cols:
    raise DataError(os.path.join(root, TASKS), f"expected a task string and 'task_index' "
                    f"columns, got {cols}")
  return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(),
                                         table.column(text).to_pylist())}


def _episodes(root: str) -> list[dict[str, Any]]:
  files = sorted(glob.glob(os.path.join(root, EPISODES_GLOB)))
  if not files:
    raise DataError(root, f"no episode metadata ({EPISODES_GLOB})")
  rows = []
  for path in files:
    rows += _read_table(path, "episode metadata").to_pylist()
  for need in ("episode_index", "length", "data/chunk_index", "data/file_index"):
    if rows and need not in rows[0]:
      raise DataError(files[0], f"episode metadata has no {need!r} column")
  return sorted(rows, key=lambda r: r["episode_index"])


def count(root: str) -> int:
  read_info(root)
  return len(_episodes(root))


class _FrameFile:
  """The frames of one data parquet file, grouped by episode (the file being read)."""

  def __init__(self, path: str):
    self.path = path
    table = _read_table(path, "frame data")
    if "episode_index" not in table.column_names:
      raise DataError(path, "frame data has no 'episode_index' column")
    self.columns = {c: table.column(c) for c in table.column_names}
    self.episode = np.asarray(table.column("episode_index").to_numpy(), np.int64)

  def rows(self, episode: int) -> np.ndarray:
    return np.flatnonzero(self.episode == episode)


def _stack(values, where: str, key: str) -> np.ndarray:
  try:
    return np.asarray(values.to_pylist() if hasattr(values, "to_pylist") else values)
  except ValueError as e:  # ragged lists
    raise DataError(where, f"rows of different lengths: {e}", key=key) from None


def _decode_image(cell, where: str, key: str, step: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = cell.get("bytes") if isinstance(cell, dict) else None
  if not data:
    raise DataError(where, "image without bytes (a path-only image is not supported)",
                    step=step, key=key)
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(where, f"undecodable image: {e}", step=step, key=key) from None


def decode_video(path: str, times: np.ndarray, fps: float, where: str, key: str) -> np.ndarray:
  """uint8[T, H, W, 3]: the frames of `path` at `times` (seconds, increasing)."""
  import av  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise DataError(where, f"video file missing: {path}", key=key)
  tol = 0.25 / float(fps)
  out: list[np.ndarray] = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise DataError(where, f"{path} has no video stream", key=key)
      stream = container.streams.video[0]
      start = max(float(times[0]) - tol, 0.0)
      container.seek(int(start / stream.time_base), stream=stream, backward=True)
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        i = len(out)
        if frame.time < times[i] - tol:
          continue  # before the episode (the seek lands on a key frame)
        if frame.time > times[i] + tol:
          break  # the frame at times[i] is not in the file
        out.append(frame.to_ndarray(format="rgb24"))
        if len(out) == len(times):
          break
  except av.error.FFmpegError as e:
    raise DataError(where, f"cannot decode {path}: {e}", key=key) from None
  if len(out) < len(times):
    raise DataError(where, f"{path} has no frame at {times[len(out)]:.4f} s (frame "
                    f"{len(out)} of the episode; the metadata's timestamps and the video "
                    "disagree)", step=len(out), key=key)
  return np.stack(out)


def sources(root: str, source_cls) -> Iterator[Any]:
  """One source_cls(where, episode_id, path, get, names) per episode, in episode order."""
  info = read_info(root)
  fps = float(info["fps"])
  features = info["features"]
  tasks = _tasks(root)
  video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
  current: _FrameFile | None = None
  for ep in _episodes(root):
    index = int(ep["episode_index"])
    data_path = os.path.join(root, info["data_path"].format(
        chunk_index=int(ep["data/chunk_index"]), file_index=int(ep["data/file_index"])))
    if current is None or current.path != data_path:
      current = _FrameFile(data_path)
    rows = current.rows(index)
    where = f"{root}: episode {index} ({os.path.relpath(data_path, root)})"
    if len(rows) != int(ep["length"]):
      raise DataError(where, f"{len(rows)} frames in the data file, the episode metadata says "
                      f"{ep['length']}", key="episode_index")
    frame_file = current
    columns = {c: v.take(rows) for c, v in frame_file.columns.items()}
    order = np.argsort(np.asarray(columns["frame_index"].to_numpy()) if "frame_index" in columns
                       else np.arange(len(rows)))
    timestamps = (np.asarray(columns["timestamp"].to_numpy(), np.float64)[order]
                  if "timestamp" in columns else np.arange(len(rows)) / fps)

    def get(key, columns=columns, order=order, ep=ep, where=where, timestamps=timestamps):
      if key == TASK_KEY:
        if "task_index" not in columns:
          return None
        ids = np.asarray(columns["task_index"].to_numpy())[order]
        missing = sorted(set(ids.tolist()) - set(tasks))
        if missing:
          raise DataError(where, f"task_index {missing[0]} is not in {TASKS}", key="task_index")
        return np.asarray([tasks[int(i)] for i in ids])
      if key in video_keys:
        video = os.path.join(root, info["video_path"].format(
            video_key=key, chunk_index=int(ep[f"videos/{key}/chunk_index"]),
            file_index=int(ep[f"videos/{key}/file_index"])))
        return decode_video(video, float(ep[f"videos/{key}/from_timestamp"]) + timestamps,
                            fps, where, key)
      if key not in columns:
        return None
      if features.get(key, {}).get("dtype") == "image":
        cells = columns[key].to_pylist()
        return np.stack([_decode_image(cells[j], where, key, t) for t, j in enumerate(order)])
      values = _stack(columns[key], where, key)
      return values[order]

    def names(columns=columns):
      return sorted(set(columns) - set(_BOOKKEEPING)) + video_keys + [TASK_KEY]

    yield source_cls(where, f"episode_{index:06d}", data_path, get, names)
