"""Dataset statistics: computed once, cached beside the dataset, stored in checkpoints.

`load_or_compute(data_dir, spec)` returns the statistics of an RLDS dataset,
reading `<data_dir>/qsft_stats.json` when its fingerprint still matches the
dataset (dataset_info.json, the files' names, sizes and sha256, the split, and
how the robot config maps and shapes the keys) and recomputing otherwise. Layout:

  {"version": 1, "fingerprint": str, "num_episodes": int, "num_steps": int,
   "action": {"names", "q01", "q99", "min", "max", "mean", "std"},   # per dimension
   "state": {"mean", "std", "min", "max"},                          # only if state_dim > 0
   "reward": {"min", "max", "mean", "is_sparse_binary"},
   "episode_return": {"min", "max", "mean", "std",
                      "quantiles": {"0.0", "0.05", ..., "1.0"}},     # every 0.05
   "episode_length": {"min", "max", "mean"}, "success_rate": float, "terminal_rate": float,
   "per_behavior": {label: {"episodes", "steps", "success_rate"}}}   # from episode metadata

Definitions: quantiles use np.quantile (linear) over all steps; std is the
population std (ddof=0); an episode's return is its undiscounted reward sum.
An episode counts as a success when its metadata says so (`success`, which our
writer always stores); without that field, when its last step is terminal with
a positive reward. `terminal_rate` is the fraction of episodes whose last step
is terminal (the rest ended on a time limit). `per_behavior` groups episodes by
the metadata's `behavior` label (data_tools.generate), "" when it has none. Only actions, states, rewards and
flags are kept in memory, never images. TF only through rlds_reader; the math
is numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any

import numpy as np
from absl import logging

from qsft_vla import checksums
from qsft_vla.data import rlds_reader
from qsft_vla.data.episode import DataError
from qsft_vla.robot import RobotSpec

VERSION = 3
STATS_FILE = "qsft_stats.json"
# A 0.05 grid, so filtered BC can keep episodes above any return quantile
# (return_quantile interpolates between grid points).
RETURN_QUANTILES = tuple(round(0.05 * i, 2) for i in range(21))
RESCALE_MODES = ("none", "auto", "minmax")


def cache_path(data_dir: str, split: str = "train") -> str:
  """<data_dir>/qsft_stats.json for the "train" split; a sliced or other split
  ("train[:95%]") has its own file beside it, so runs on different slices of one
  dataset (a training slice and a held-out one) do not overwrite each other's cache."""
  if split == "train":
    return os.path.join(data_dir, STATS_FILE)
  readable = re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")
  digest = hashlib.sha256(split.encode()).hexdigest()[:8]  # "[:50%]" and "[50%:]" differ
  return os.path.join(data_dir, f"{STATS_FILE}.{readable}-{digest}")


def fingerprint(data_dir: str, spec: RobotSpec, split: str = "train") -> str:
  """Changes when the dataset files or the robot's view of them change."""
  info_path = rlds_reader.dataset_info_path(data_dir)
  with open(info_path, "rb") as f:
    info_hash = hashlib.sha256(f.read()).hexdigest()
  # Our own cache files are beside the data but are not the data. Every file's
  # bytes count (sha256, ~1 s per GB): a bit-flipped shard of the same size and
  # name is another dataset, and its cached statistics must not be reused.
  files = sorted((e.name, e.stat().st_size, checksums.file_sha256(e.path))
                 for e in os.scandir(data_dir)
                 if e.is_file() and not e.name.startswith(STATS_FILE)
                 and not e.name.startswith("." + STATS_FILE))
  desc = {"version": VERSION, "split": split, "dataset_info": info_hash, "files": files,
          "keys": rlds_reader.canonical_step_keys(spec),
          "action_names": [d.name for d in spec.action_dims], "state_dim": spec.state_dim}
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


class Accumulator:
  """Collects what the statistics need, one episode at a time (no images kept).

  `compute` feeds it the episodes read back from disk; the converter feeds it
  the episodes it writes, which saves a second pass over the images.
  """

  def __init__(self, spec: RobotSpec):
    self.spec = spec
    self.actions: list[np.ndarray] = []
    self.rewards: list[np.ndarray] = []
    self.returns: list[float] = []
    self.lengths: list[int] = []
    self.successes: list[bool] = []
    self.terminals: list[bool] = []
    self.behaviors: list[str] = []
    # State moments merged per episode (Chan et al.), so states are not kept.
    self._state_n = 0
    self._state_mean = self._state_m2 = self._state_min = self._state_max = None

  def add(self, episode: dict[str, Any], where: str) -> None:
    steps = episode["steps"]
    action = np.asarray(steps["action"], np.float64)
    if action.ndim != 2 or action.shape[1] != self.spec.action_dim:
      raise DataError(where, f"expected shape (T, {self.spec.action_dim}), got {action.shape}",
                      key="action")
    length = action.shape[0]
    if length == 0:
      raise DataError(where, "empty episode (0 steps); run data_tools.validate", key="steps")
    reward = np.asarray(steps["reward"], np.float64).reshape(-1)
    if reward.shape != (length,):
      raise DataError(where, f"expected shape ({length},), got {reward.shape}", key="reward")
    _finite(action, where, "action")
    _finite(reward, where, "reward")
    terminal = bool(np.asarray(steps["is_terminal"])[-1])
    md = episode.get("episode_metadata") or {}
    success = bool(md["success"]) if "success" in md else terminal and reward[-1] > 0
    self.actions.append(action.astype(np.float32))
    self.rewards.append(reward.astype(np.float32))
    self.returns.append(float(reward.sum()))
    self.lengths.append(length)
    self.successes.append(success)
    self.terminals.append(terminal)
    self.behaviors.append(str(md.get("behavior", "")))
    if self.spec.state_dim:
      state = np.asarray(steps["observation"]["state"], np.float64)
      if state.shape != (length, self.spec.state_dim):
        raise DataError(where, f"expected shape ({length}, {self.spec.state_dim}), got "
                        f"{state.shape}", key="observation/state")
      _finite(state, where, "observation/state")
      self._add_state(state)

  def _add_state(self, x: np.ndarray) -> None:
    n_b, mean_b = x.shape[0], x.mean(axis=0)
    m2_b = ((x - mean_b) ** 2).sum(axis=0)
    if self._state_n == 0:
      self._state_n, self._state_mean, self._state_m2 = n_b, mean_b, m2_b
      self._state_min, self._state_max = x.min(axis=0), x.max(axis=0)
      return
    n_a, n = self._state_n, self._state_n + n_b
    delta = mean_b - self._state_mean
    self._state_mean = self._state_mean + delta * (n_b / n)
    self._state_m2 = self._state_m2 + m2_b + delta ** 2 * (n_a * n_b / n)
    self._state_n = n
    self._state_min = np.minimum(self._state_min, x.min(axis=0))
    self._state_max = np.maximum(self._state_max, x.max(axis=0))

  def result(self, where: str = "dataset") -> dict[str, Any]:
    """The statistics dict, without the fingerprint (set by `save` / `compute`)."""
    if not self.lengths:
      raise DataError(where, "no episodes")
    actions = np.concatenate(self.actions).astype(np.float64)
    rewards = np.concatenate(self.rewards).astype(np.float64)
    returns = np.asarray(self.returns, np.float64)
    lengths = np.asarray(self.lengths)
    stats: dict[str, Any] = {
        "version": VERSION, "fingerprint": "",
        "num_episodes": len(self.lengths), "num_steps": int(lengths.sum()),
        "action": {"names": [d.name for d in self.spec.action_dims],
                   "q01": _floats(np.quantile(actions, 0.01, axis=0)),
                   "q99": _floats(np.quantile(actions, 0.99, axis=0)),
                   "min": _floats(actions.min(axis=0)), "max": _floats(actions.max(axis=0)),
                   "mean": _floats(actions.mean(axis=0)), "std": _floats(actions.std(axis=0))},
    }
    if self.spec.state_dim:
      stats["state"] = {"mean": _floats(self._state_mean),
                        "std": _floats(np.sqrt(self._state_m2 / self._state_n)),
                        "min": _floats(self._state_min), "max": _floats(self._state_max)}
    stats["reward"] = {"min": float(rewards.min()), "max": float(rewards.max()),
                       "mean": float(rewards.mean()),
                       "is_sparse_binary": bool(np.all((rewards == 0) | (rewards == 1)))}
    stats["episode_return"] = {
        "min": float(returns.min()), "max": float(returns.max()),
        "mean": float(returns.mean()), "std": float(returns.std()),
        "quantiles": {str(q): float(np.quantile(returns, q)) for q in RETURN_QUANTILES}}
    stats["episode_length"] = {"min": int(lengths.min()), "max": int(lengths.max()),
                               "mean": float(lengths.mean())}
    stats["success_rate"] = float(np.mean(self.successes))
    stats["terminal_rate"] = float(np.mean(self.terminals))
    labels = np.asarray(self.behaviors)
    successes = np.asarray(self.successes)
    stats["per_behavior"] = {
        b: {"episodes": int(np.sum(labels == b)), "steps": int(lengths[labels == b].sum()),
            "success_rate": float(successes[labels == b].mean())}
        for b in sorted(set(self.behaviors))}
    return stats


def compute(data_dir: str, spec: RobotSpec, split: str = "train") -> dict[str, Any]:
  """Reads every episode of the split once and returns its statistics."""
  fp = fingerprint(data_dir, spec, split)
  acc = Accumulator(spec)
  for i, episode in rlds_reader.iterate_episodes(data_dir, spec, split):
    acc.add(episode, f"{data_dir}: episode {i}")
  stats = acc.result(data_dir)
  stats["fingerprint"] = fp
  return stats


def save(data_dir: str, spec: RobotSpec, stats: dict[str, Any], split: str = "train") -> str:
  """Writes the cache atomically (stamping the fingerprint if unset); returns its path."""
  if not stats.get("fingerprint"):
    stats = dict(stats, fingerprint=fingerprint(data_dir, spec, split))
  path = cache_path(data_dir, split)
  fd, tmp = tempfile.mkstemp(prefix="." + STATS_FILE + ".tmp-", dir=data_dir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(stats, f, indent=2, allow_nan=False)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def load_or_compute(data_dir: str, spec: RobotSpec, split: str = "train",
                    recompute: bool = False) -> dict[str, Any]:
  """Cached statistics if still valid for this dataset and robot, else computes and caches."""
  path = cache_path(data_dir, split)
  if not recompute and os.path.exists(path):
    fp = fingerprint(data_dir, spec, split)
    try:
      with open(path) as f:
        cached = json.load(f)
    except (OSError, ValueError) as e:
      logging.warning("unreadable statistics cache %s (%s); recomputing", path, e)
    else:
      if cached.get("version") == VERSION and cached.get("fingerprint") == fp:
        return cached
      logging.info("statistics cache %s is stale (dataset or robot keys changed); recomputing",
                   path)
  stats = compute(data_dir, spec, split)
  try:
    save(data_dir, spec, stats, split)
  except OSError as e:  # a read-only dataset still gets its statistics, uncached
    logging.warning("cannot cache statistics at %s: %s", path, e)
  return stats


def return_quantile(stats: dict[str, Any], q: float) -> float:
  """The q-quantile of episode returns: exact on the 0.05 grid, linear between."""
  if not 0.0 <= q <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {q}")
  table = stats["episode_return"]["quantiles"]
  grid = np.asarray(RETURN_QUANTILES)
  return float(np.interp(q, grid, [table[str(g)] for g in RETURN_QUANTILES]))


def filter_threshold(stats: dict[str, Any], q: float) -> float:
  """The return at or above which filtered BC keeps an episode (keep: return >= it).

  The q-quantile of episode returns, except where that quantile is the lowest
  return while some episodes do better (e.g. sparse 0/1 rewards with half or
  more of the episodes failed, where the median is 0): then ">= quantile" would
  keep everything and filtered BC would silently be BC, so the threshold is
  just above the lowest return and only the better episodes are kept. When all
  returns are equal there is nothing to filter on and all are kept.
  """
  t = return_quantile(stats, q)
  lo, hi = stats["episode_return"]["min"], stats["episode_return"]["max"]
  if t <= lo < hi:
    return float(np.nextafter(np.float32(lo), np.float32(np.inf)))
  return t


def rescale_reward_params(stats: dict[str, Any], gamma: float, mode: str) -> tuple[float, float]:
  """(scale, shift) so that `scale * r + shift` keeps Q in [0, 1] (QSFT.md).

  "none": identity. "minmax": maps [min, max] onto [0, 1 - gamma]. "auto": sparse
  0/1 rewards pass through unchanged, others as "minmax". A constant reward c
  (min == max) carries no signal to rescale: it becomes c clipped to [0, 1 - gamma].
  """
  if mode not in RESCALE_MODES:
    raise ValueError(f"reward rescale mode must be one of {RESCALE_MODES}, got {mode!r}")
  if mode == "none":
    return 1.0, 0.0
  if not 0.0 <= gamma < 1.0:
    raise ValueError(f"gamma must be in [0, 1) to rescale rewards, got {gamma}")
  r = stats["reward"]
  if mode == "auto" and r["is_sparse_binary"]:
    return 1.0, 0.0
  lo, hi, top = float(r["min"]), float(r["max"]), 1.0 - gamma
  if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
    return 0.0, min(max(lo, 0.0), top)
  scale = top / (hi - lo)
  return scale, -lo * scale


def _finite(x: np.ndarray, where: str, key: str) -> None:
  bad = ~np.isfinite(x)
  if bad.any():
    t = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))
    raise DataError(where, f"non-finite value {x[t].tolist()}; run data_tools.validate",
                    step=t, key=key)


def _floats(x: np.ndarray) -> list[float]:
  return [float(v) for v in np.asarray(x, np.float64)]
