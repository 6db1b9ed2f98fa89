"""qsft_vla.data.statistics: known answers, the cache, its invalidation, reward rescaling."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from qsft_vla.config import load_config_file
from qsft_vla.data import statistics
from qsft_vla.data.episode import DataError
from qsft_vla.data.rlds_writer import RLDSWriter
from qsft_vla.robot import RobotSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
METAWORLD = str(ROOT / "robot_configs" / "metaworld.py")

# Four episodes, 10 steps. Action dim 0 runs -0.45, -0.35, ..., 0.45 over the
# steps; the state is the global step index (+ the dimension index).
LENGTHS = (2, 3, 4, 1)
REWARDS = ([0, 1], [0, 0, 0], [0.5, 0, 0, 0.5], [2.0])      # returns 1, 0, 1, 2
TERMINAL = (True, False, True, True)
SUCCESS = (True, False, False, True)


@pytest.fixture(scope="module")
def spec():
  return RobotSpec.from_config(load_config_file(METAWORLD).robot)


def hand_built(spec, scale=1.0):
  start = 0
  for length, reward, term, succ in zip(LENGTHS, REWARDS, TERMINAL, SUCCESS):
    t = np.arange(start, start + length)
    start += length
    action = np.zeros((length, 4), np.float32)
    action[:, 0] = (t * 0.1 - 0.45) * scale
    action[:, 3] = 1.0
    is_terminal = np.zeros(length, bool)
    is_terminal[-1] = term
    yield {"steps": {
        "observation": {"image": np.zeros((length, 64, 64, 3), np.uint8),
                        "state": (t[:, None] + np.arange(39)[None, :]).astype(np.float32)},
        "action": action, "reward": np.asarray(reward, np.float32),
        "discount": np.ones(length, np.float32), "is_first": np.arange(length) == 0,
        "is_last": np.arange(length) == length - 1, "is_terminal": is_terminal,
        "language_instruction": ["reach"] * length},
        "episode_metadata": {"success": succ}}


def write(out, spec, scale=1.0, overwrite=False, episodes=4):
  with RLDSWriter(str(out), spec, name="hand", overwrite=overwrite) as w:
    for _, ep in zip(range(episodes), hand_built(spec, scale)):
      w.add(ep)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, spec):
  out = tmp_path_factory.mktemp("stats") / "ds"
  write(out, spec)
  return out


def test_known_answers(dataset, spec):
  s = statistics.compute(str(dataset), spec)
  assert s["version"] == statistics.VERSION and len(s["fingerprint"]) == 64
  assert s["num_episodes"] == 4 and s["num_steps"] == 10
  a = s["action"]
  assert a["names"] == ["dx", "dy", "dz", "gripper"]
  # np.quantile, linear: position 0.01 * 9 = 0.09 -> -0.45 + 0.09 * 0.1.
  np.testing.assert_allclose(a["q01"], [-0.441, 0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(a["q99"], [0.441, 0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(a["min"], [-0.45, 0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(a["max"], [0.45, 0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(a["mean"], [0, 0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(a["std"], [np.sqrt(8.25) * 0.1, 0, 0, 0], atol=1e-6)
  st = s["state"]
  np.testing.assert_allclose(st["mean"], 4.5 + np.arange(39))
  np.testing.assert_allclose(st["std"], np.full(39, np.sqrt(8.25)))
  np.testing.assert_allclose(st["min"], np.arange(39))
  np.testing.assert_allclose(st["max"], 9 + np.arange(39))
  assert s["reward"] == {"min": 0.0, "max": 2.0, "mean": pytest.approx(0.4),
                         "is_sparse_binary": False}
  r = s["episode_return"]
  assert (r["min"], r["max"], r["mean"]) == (0.0, 2.0, 1.0)
  assert r["std"] == pytest.approx(np.sqrt(0.5))
  # Sorted returns 0, 1, 1, 2 at positions q * 3.
  assert len(r["quantiles"]) == 21
  assert {k: r["quantiles"][k] for k in ("0.1", "0.25", "0.5", "0.75", "0.9")} == pytest.approx(
      {"0.1": 0.3, "0.25": 0.75, "0.5": 1.0, "0.75": 1.25, "0.9": 1.7})
  # Off the grid: linear between grid points (here also np.quantile's answer).
  assert statistics.return_quantile(s, 0.125) == pytest.approx(0.375)
  assert statistics.return_quantile(s, 0.5) == 1.0
  assert s["episode_length"] == {"min": 1, "max": 4, "mean": 2.5}
  assert s["success_rate"] == 0.5 and s["terminal_rate"] == 0.75
  json.dumps(s, allow_nan=False)  # plain JSON, as stored in checkpoints


def _returns_stats(returns):
  r = np.asarray(returns, np.float64)
  return {"episode_return": {"min": float(r.min()), "max": float(r.max()),
                             "quantiles": {str(q): float(np.quantile(r, q))
                                           for q in statistics.RETURN_QUANTILES}}}


def test_filter_threshold_keeps_the_better_episodes_when_most_fail():
  """30% successes: the median return is the minimum (0); ">= median" would keep all."""
  s = _returns_stats([0.0] * 70 + [1.0] * 30)
  t = statistics.filter_threshold(s, 0.5)
  assert 0.0 < t <= 1.0
  returns = np.array([0.0] * 70 + [1.0] * 30)
  assert np.mean(returns >= t) == pytest.approx(0.3)
  assert statistics.filter_threshold(s, 0.8) == 1.0         # above the minimum: the quantile
  # Mostly successes: the quantile itself (1.0) keeps the successes.
  assert statistics.filter_threshold(_returns_stats([0.0] * 20 + [1.0] * 80), 0.5) == 1.0
  # Continuous returns: the quantile.
  cont = _returns_stats(np.linspace(0, 1, 101))
  assert statistics.filter_threshold(cont, 0.5) == pytest.approx(0.5)
  # All equal: nothing to filter on, all kept.
  assert statistics.filter_threshold(_returns_stats([1.0] * 10), 0.5) == 1.0


def test_success_without_metadata_is_terminal_with_positive_reward(spec):
  acc = statistics.Accumulator(spec)
  for i, ep in enumerate(hand_built(spec)):
    del ep["episode_metadata"]
    acc.add(ep, f"episode {i}")
  # Terminal with last reward > 0: episodes 0 (r=1), 2 (r=0.5), 3 (r=2); not 1 (truncated).
  assert acc.result()["success_rate"] == 0.75


def test_bad_episodes_named(spec):
  acc = statistics.Accumulator(spec)
  ep = next(hand_built(spec))
  ep["steps"]["reward"][1] = np.nan
  with pytest.raises(DataError, match=r"episode 7, step 1, key 'reward'"):
    acc.add(ep, "episode 7")
  ep = next(hand_built(spec))
  ep["steps"]["action"] = ep["steps"]["action"][:0]
  with pytest.raises(DataError, match="empty episode"):
    acc.add(ep, "episode 0")
  with pytest.raises(DataError, match="no episodes"):
    statistics.Accumulator(spec).result()


def test_cache_hit_and_invalidation(tmp_path, spec, monkeypatch):
  out = tmp_path / "ds"
  write(out, spec, episodes=2)
  calls = []
  real_compute = statistics.compute

  def counting(*args, **kwargs):
    calls.append(args)
    return real_compute(*args, **kwargs)

  monkeypatch.setattr(statistics, "compute", counting)
  first = statistics.load_or_compute(str(out), spec)
  path = out / statistics.STATS_FILE
  assert len(calls) == 1 and path.exists()
  mtime = path.stat().st_mtime_ns
  assert statistics.load_or_compute(str(out), spec) == first
  assert len(calls) == 1 and path.stat().st_mtime_ns == mtime     # hit: nothing recomputed
  assert not [f for f in os.listdir(out) if ".tmp" in f]

  # Another key mapping is another fingerprint (the cache is per robot view of the data).
  keys = dict(spec.rlds_keys, reward="reward_other")
  assert statistics.fingerprint(str(out), spec) != statistics.fingerprint(
      str(out), dataclasses.replace(spec, rlds_keys=keys))
  assert statistics.fingerprint(str(out), spec) != statistics.fingerprint(
      str(out), spec, split="test")

  # One bit of one shard flips (same names, same sizes): another fingerprint.
  shard = max((os.path.join(out, f) for f in os.listdir(out) if ".tfrecord" in f),
              key=os.path.getsize)
  before = statistics.fingerprint(str(out), spec)
  with open(shard, "r+b") as f:
    f.seek(os.path.getsize(shard) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 1]))
  assert statistics.fingerprint(str(out), spec) != before

  # The dataset changes under the same name: the cache is stale and recomputed.
  write(out, spec, scale=2.0, overwrite=True, episodes=2)
  assert not path.exists() or json.loads(path.read_text())["fingerprint"] != \
      statistics.fingerprint(str(out), spec)
  second = statistics.load_or_compute(str(out), spec)
  assert len(calls) == 2
  assert second["num_steps"] == 5 and second["action"]["max"][0] == pytest.approx(-0.1)
  assert json.loads(path.read_text()) == second

  # --recompute and a corrupt cache file both recompute (a stub: the pass is tested above).
  monkeypatch.setattr(statistics, "compute", lambda *a, **k: calls.append(a) or dict(second))
  assert statistics.load_or_compute(str(out), spec, recompute=True) == second
  assert len(calls) == 3
  path.write_text("{not json")
  assert statistics.load_or_compute(str(out), spec) == second
  assert len(calls) == 4 and json.loads(path.read_text()) == second


@pytest.mark.parametrize("mode,reward,gamma,want", [
    ("none", dict(min=-3.0, max=5.0, is_sparse_binary=False), 0.99, (1.0, 0.0)),
    ("auto", dict(min=0.0, max=1.0, is_sparse_binary=True), 0.99, (1.0, 0.0)),
    ("auto", dict(min=-1.0, max=3.0, is_sparse_binary=False), 0.9, (0.025, 0.025)),
    ("minmax", dict(min=0.0, max=1.0, is_sparse_binary=True), 0.99, (0.01, 0.0)),
    ("minmax", dict(min=2.0, max=4.0, is_sparse_binary=False), 0.5, (0.25, -0.5)),
    # Constant rewards: no division by zero; the constant clipped into [0, 1 - gamma].
    ("minmax", dict(min=0.05, max=0.05, is_sparse_binary=False), 0.9, (0.0, 0.05)),
    ("auto", dict(min=7.0, max=7.0, is_sparse_binary=False), 0.9, (0.0, 0.1)),
    ("minmax", dict(min=-2.0, max=-2.0, is_sparse_binary=False), 0.9, (0.0, 0.0)),
])
def test_rescale_reward_params_known_answers(mode, reward, gamma, want):
  scale, shift = statistics.rescale_reward_params({"reward": reward}, gamma, mode)
  assert (scale, shift) == pytest.approx(want)
  if mode != "none" and reward["max"] > reward["min"] and not (
      mode == "auto" and reward["is_sparse_binary"]):
    assert reward["min"] * scale + shift == pytest.approx(0.0)
    assert reward["max"] * scale + shift == pytest.approx(1 - gamma)


def test_rescale_reward_params_refuses_bad_arguments():
  stats = {"reward": dict(min=0.0, max=2.0, is_sparse_binary=False)}
  with pytest.raises(ValueError, match="mode"):
    statistics.rescale_reward_params(stats, 0.9, "zscore")
  with pytest.raises(ValueError, match="gamma"):
    statistics.rescale_reward_params(stats, 1.0, "minmax")


def test_binary_prints_cached_statistics(dataset):
  r = subprocess.run([sys.executable, "-m", "data_tools.stats", f"--data={dataset}",
                      f"--config={METAWORLD}"], capture_output=True, text=True, cwd=ROOT,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  assert f"cached at {dataset / statistics.STATS_FILE}" in r.stdout
  assert "episodes 4, steps 10" in r.stdout and "success rate 0.500" in r.stdout
  assert (dataset / statistics.STATS_FILE).exists()


def test_slices_have_their_own_cache(dataset, spec):
  """A training slice and a held-out slice of one dataset cache side by side."""
  dataset = str(dataset)
  whole = statistics.load_or_compute(dataset, spec)
  head = statistics.load_or_compute(dataset, spec, "train[:50%]")
  tail = statistics.load_or_compute(dataset, spec, "train[50%:]")
  assert head["num_episodes"] + tail["num_episodes"] == whole["num_episodes"]
  paths = {statistics.cache_path(dataset, s) for s in ("train", "train[:50%]", "train[50%:]")}
  assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
  assert statistics.load_or_compute(dataset, spec)["fingerprint"] == whole["fingerprint"]
  assert statistics.cache_path(dataset) == os.path.join(dataset, statistics.STATS_FILE)
