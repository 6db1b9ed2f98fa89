"""Training metrics: one JSON object per logged step in metrics.jsonl, TensorBoard scalars,
and a progress line (absl logging) with rate and ETA.

On resume, lines of metrics.jsonl past the restored step (written after the
last checkpoint of a killed run) are dropped, so the file reads like one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

JSONL = "metrics.jsonl"
TB_DIR = "tensorboard"


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):  # a line cut by a kill: drop it
        continue
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, JSONL)) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
  """write(step, scalars) appends to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, JSONL)
    _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, TB_DIR))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    # Strict JSON: a non-finite value is null (json.dumps would write bare NaN).
    strict = {k: (v if np.isfinite(v) else None) for k, v in row.items()}
    self._file.write(json.dumps(strict, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != "step":
            self._tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """A MetricsWriter that writes nothing: the non-primary processes of a group
  (the primary one writes the run's metrics once)."""

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    del step, scalars

  def close(self) -> None:
    pass


class Progress:
  """Steps/s over the last interval and ETA; time spent outside training
  (checkpoints, evaluation) is excluded via pause()/resume()."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._excluded = 0.0
    self._paused_at = None

  def pause(self) -> None:
    self._paused_at = time.perf_counter()

  def resume(self) -> None:
    if self._paused_at is not None:
      self._excluded += time.perf_counter() - self._paused_at
      self._paused_at = None

  def tick(self, step: int) -> dict[str, float]:
    """Rate since the previous tick; resets the interval."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time - self._excluded, 1e-9)
    rate = (step - self._last_step) / elapsed
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_seconds": eta}

  def log(self, step: int, timing: Mapping[str, float], metrics: Mapping[str, Any],
          keys=("loss_pi", "loss_p")) -> None:
    shown = " ".join(f"{k}={float(np.asarray(metrics[k])):.4f}" for k in keys if k in metrics)
    logging.info("step %d/%d (%.0f%%) %s | %.2f steps/s, ETA %s", step, self.total,
                 100.0 * step / max(self.total, 1), shown, timing["steps_per_sec"],
                 format_duration(timing["eta_seconds"]))
