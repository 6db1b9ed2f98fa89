"""data_tools.generate: determinism across workers, metadata, atomic failure, the binary."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, robot_spec
from data_tools import generate as gen
from qsft_vla.data import rlds_reader
from qsft_vla.data.episode import check_episode
from qsft_vla.data.rlds_writer import PROVENANCE_FILE, RLDSWriter
from qsft_vla.envs import babyai as babyai_env

BABYAI = "babyai:BabyAI-GoToLocal-v0"
NOISE = [0.0, 0.5, 1.0]


def read_back(path, spec):
  return [ep for _, ep in rlds_reader.iterate_episodes(path, spec)]


def run(out, workers, episodes=4, **kw):
  return gen.generate(BABYAI, episodes, NOISE, 3, str(out), workers=workers, progress=False,
                      **kw)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """The same seed with one in-process worker and with two spawned workers, read back."""
  root = tmp_path_factory.mktemp("gen")
  one = run(root / "w1", workers=1)
  two = run(root / "w2", workers=2)
  spec = robot_spec("babyai")
  return one, two, read_back(one["out"], spec), read_back(two["out"], spec)


def test_same_seed_same_episodes_whatever_the_workers(two_runs):
  one, two, a, b = two_runs
  assert one["workers"] == 1 and two["workers"] == 2
  assert len(a) == len(b) == 4
  for ea, eb in zip(a, b):
    sa, sb = ea["steps"], eb["steps"]
    assert np.array_equal(sa["observation"]["image"], sb["observation"]["image"])
    assert np.array_equal(sa["action"], sb["action"])
    assert np.array_equal(sa["reward"], sb["reward"])
    assert np.array_equal(sa["is_terminal"], sb["is_terminal"])
    assert sa["language_instruction"] == sb["language_instruction"]
    assert ea["episode_metadata"] == eb["episode_metadata"]
  # Different episodes differ (seeds are per episode, not shared).
  assert a[0]["steps"]["language_instruction"] != a[1]["steps"]["language_instruction"] or \
      not np.array_equal(a[0]["steps"]["observation"]["image"][0],
                         a[1]["steps"]["observation"]["image"][0])


def test_dataset_is_valid_with_mixed_noise_metadata(two_runs, babyai_spec):
  summary, episodes = two_runs[0], two_runs[2]
  for i, ep in enumerate(episodes):
    check_episode(ep, babyai_spec, f"episode {i}")
    md, steps = ep["episode_metadata"], ep["steps"]
    assert md["noise"] == pytest.approx(NOISE[i % 3])
    assert md["behavior"] == ("expert" if NOISE[i % 3] == 0 else f"noisy@{NOISE[i % 3]:g}")
    assert md["episode_id"] == f"{i:06d}" and md["source"] == BABYAI
    assert md["return"] == pytest.approx(float(steps["reward"].sum()))
    assert md["success"] == bool(steps["reward"][-1] == 1.0)
    assert set(np.unique(steps["reward"]).tolist()) <= {0.0, 1.0}
    assert steps["observation"]["image"].shape[1:] == (56, 56, 3)
  assert summary["episodes"] == 4 and summary["steps"] == sum(len(e["steps"]["action"])
                                                              for e in episodes)
  assert list(summary["per_behavior"]) == ["expert", "noisy@0.5", "noisy@1"]
  assert [p["episodes"] for p in summary["per_behavior"].values()] == [2, 1, 1]  # round-robin
  assert summary["per_behavior"]["expert"]["success_rate"] == 1.0
  assert summary["bytes"] > 0 and summary["bytes_per_1k_steps"] > 0
  assert summary["env_steps_per_s"] > 0
  with open(os.path.join(summary["out"], PROVENANCE_FILE)) as f:
    prov = json.load(f)["provenance"]
  assert prov["env"] == BABYAI and prov["noise"] == NOISE and prov["seed"] == 3
  assert os.path.exists(summary["stats_path"])
  assert "noisy@0.5: 1 episodes" in gen.format_summary(summary)


def test_failure_mid_generation_leaves_nothing(tmp_path, monkeypatch):
  calls = {"n": 0}
  real_reset = babyai_env.BabyAIEnv._reset

  def flaky_reset(self, seed):
    calls["n"] += 1
    if calls["n"] == 5:  # the constructor resets once; then episodes 0, 1, 2 and 3
      raise RuntimeError("simulator crashed on episode 3")
    return real_reset(self, seed)

  monkeypatch.setattr(babyai_env.BabyAIEnv, "_reset", flaky_reset)
  out = tmp_path / "data"
  with pytest.raises(RuntimeError, match="episode 3"):
    run(out, workers=1)
  assert os.listdir(tmp_path) == []


def test_writer_failure_with_workers_leaves_nothing(tmp_path, monkeypatch):
  real_add = RLDSWriter.add

  def flaky_add(self, episode, where=None):
    if self.num_episodes == 3:
      raise OSError("disk full")
    return real_add(self, episode, where)

  monkeypatch.setattr(RLDSWriter, "add", flaky_add)
  with pytest.raises(OSError, match="disk full"):
    run(tmp_path / "data", workers=2)
  assert os.listdir(tmp_path) == []


def test_a_rerun_removes_what_a_killed_run_left(tmp_path):
  """A killed writer's temporary folder (its pid gone) is removed by the next run; a
  live writer's (here: this process) is not touched."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = tmp_path / f".data.tmp-{dead.pid}-abc123"
  live = tmp_path / f".data.tmp-{os.getpid()}-def456"
  for d in (stale, live):
    d.mkdir()
    (d / "shard").write_bytes(b"x")
  run(tmp_path / "data", workers=1, episodes=1)
  assert sorted(os.listdir(tmp_path)) == sorted(["data", live.name])


def test_out_under_a_file_is_named(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a folder"):
    run(tmp_path / "notes.txt" / "data", workers=1, episodes=1)
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_existing_out_needs_overwrite(tmp_path):
  out = tmp_path / "data"
  out.mkdir()
  with pytest.raises(FileExistsError, match="overwrite"):
    run(out, workers=1, episodes=1)
  summary = run(out, workers=1, episodes=2, overwrite=True)
  assert summary["episodes"] == 2
  assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.mark.parametrize("kwargs, match", [
    ({"env_id": "babyai:Nope-v0"}, "BabyAI-GoToLocal-v0"),
    ({"env_id": "pybullet:kuka"}, "known prefix"),
    ({"noise_levels": [0.1, -1.0]}, "noise"),
    ({"noise_levels": []}, "noise"),
    ({"noise_levels": [1.5]}, "probabilities"),
    ({"behavior": "expert:1"}, "not both"),
    ({"noise_levels": None, "behavior": "expert:1,biased@2:1"}, "unknown behaviour 'biased'"),
    ({"episodes": 0}, "episodes"),
    ({"seed": -1}, "seed"),
    ({"image_encoding": "webp"}, "image_encoding"),
])
def test_bad_arguments(tmp_path, kwargs, match):
  args = {"env_id": BABYAI, "episodes": 2, "noise_levels": [0.0], "seed": 0,
          "out": str(tmp_path / "x")}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    gen.generate(**args, workers=1, progress=False)
  assert not os.path.exists(tmp_path / "x")


def test_episode_seeds_depend_on_seed_and_index_only():
  a = gen.episode_seeds(0, 5)
  b = gen.episode_seeds(0, 5)
  assert a[0] == b[0] and a[1].random() == b[1].random()
  assert gen.episode_seeds(0, 6)[0] != a[0] and gen.episode_seeds(1, 5)[0] != a[0]


@pytest.mark.slow
def test_metaworld_generation(tmp_path, metaworld_spec):
  summary = gen.generate("metaworld:pick-place-v3", 2, [0.0, 0.5], 0, str(tmp_path / "mw"),
                         max_steps=40, workers=1, image_encoding="jpeg", progress=False)
  episodes = read_back(summary["out"], metaworld_spec)
  assert [e["episode_metadata"]["noise"] for e in episodes] == [0.0, 0.5]
  for i, ep in enumerate(episodes):
    check_episode(ep, metaworld_spec, f"episode {i}", out_of_bounds="reject")
    steps = ep["steps"]
    assert steps["observation"]["state"].shape[1:] == (39,)
    assert steps["observation"]["image"].shape[1:] == (64, 64, 3)
    assert len(steps["action"]) <= 40
    assert steps["language_instruction"][0] == "pick up the puck and place it at the goal"


@pytest.mark.slow
def test_binary_runs(tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "data_tools.generate", f"--env={BABYAI}", "--episodes=2",
         "--noise=0.0,1.0", "--seed=1", f"--out={out}", "--workers=2"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote" in proc.stdout and "bytes per 1k steps" in proc.stdout
  assert os.path.exists(out / "dataset_info.json")
  with open(out / PROVENANCE_FILE) as f:
    flags = json.load(f)["provenance"]["flags"]
  assert flags["episodes"] == 2 and flags["noise"] == ["0.0", "1.0"]
  bad = subprocess.run(cmd[:3] + ["--env=babyai:Nope", f"--out={tmp_path / 'bad'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
  assert bad.returncode == 1 and "generate: error" in bad.stderr
  assert not os.path.exists(tmp_path / "bad")


def test_rollout_workers_are_tf_free():
  """What a spawned worker imports (this module, the adapters) runs with TF unimportable."""
  code = textwrap.dedent("""
      import importlib.abc, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "reverb", "rlds"):
            raise ImportError(f"{name} is blocked in rollout workers")
      sys.meta_path.insert(0, Block())
      from data_tools import generate as gen
      gen._init_worker("babyai:BabyAI-GoToLocal-v0", None, 0)
      assert gen._WORKER_ERROR is None, gen._WORKER_ERROR
      from qsft_vla.envs.behaviors import Behavior
      ep = gen._rollout_in_worker((0, Behavior("noisy", 0.5)))
      assert ep["episode_metadata"]["noise"] == 0.5
      print("WORKER TF-FREE OK")
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "WORKER TF-FREE OK" in proc.stdout
