"""qsft_vla.replay.actor: a tiny trained run acts in BabyAI and its episodes reach a
real Reverb server (free localhost port) as the pipeline's own examples."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from qsft_vla import config as qconfig
from qsft_vla.replay import actor as actor_lib
from qsft_vla.replay import insert as insert_lib
from qsft_vla.replay.server import ReplayServer

from conftest import BABYAI_CONFIG, babyai_dataset, robot_spec
from test_replay import _sample_all

ENV = "babyai:BabyAI-GoToLocal-v0"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A real two-step training run with checkpoints at steps 1 and 2."""
  from qsft_vla import train
  data = babyai_dataset(tmp_path_factory, episodes=3, max_steps=8)
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  cfg.data.dir = data
  cfg.data.shuffle_buffer = 16
  cfg.model.rt1_small.update(width=32, depth=1, num_heads=2, conv_channels=(8, 16, 16),
                             tokens_per_image=2, text_dim=16)
  cfg.train.update(num_steps=2, batch_size=4, checkpoint_every=1, log_every=1)
  cfg.eval.every = 0
  workdir = str(tmp_path_factory.mktemp("run") / "run")
  train.train(cfg, workdir)
  return workdir


def _content(ex):
  """Each chunk is its own one-episode dataset (same episode and step indices), so
  items are told apart by what they hold."""
  return (int(ex["step_index"]), ex["action_tokens"].tobytes(), ex["reward"].tobytes(),
          ex["observation"]["image"].tobytes())


def _rows(workdir, actor_id="seed0"):
  with open(os.path.join(workdir, "actors", actor_id, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_actor_inserts_its_episodes_as_the_pipelines_examples(run, monkeypatch):
  """Two episodes: the table holds one item per step, equal to the pipeline's
  examples of the recorded episodes under the run's statistics; the actor picks
  up a newer checkpoint between episodes; a restarted actor continues after its
  earlier episodes instead of overwriting them."""
  from qsft_vla.policy import TrainedPolicy
  metrics = os.path.join(run, "actors", "seed0", "metrics.jsonl")
  # Step 1 is the newest until the first episode is done, then step 2 appears.
  monkeypatch.setattr(actor_lib, "_newest_step", lambda workdir: 2 if os.path.exists(metrics)
                      and os.path.getsize(metrics) else 1)
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  with ReplayServer(cfg) as server:
    summary = actor_lib.run(run, ENV, server.address, episodes=2, epsilon=0.2, max_steps=8)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]           # reloaded between episodes
    assert summary["episodes"] == 2 and server.size() == summary["inserted"]
    assert summary["inserted"] == sum(r["length"] for r in rows)
    assert [r["inserted"] for r in rows] == [r["length"] for r in rows]    # per episode
    assert rows[-1]["inserted_total"] == summary["inserted"]
    chunks = sorted(os.path.join(run, "actors", "seed0", n)
                    for n in os.listdir(os.path.join(run, "actors", "seed0"))
                    if n.startswith("episode_"))
    assert len(chunks) == 2
    policy = TrainedPolicy.load(run)
    run_cfg = ml_collections.ConfigDict(policy.config)
    want = {_content(ex): ex for chunk in chunks
            for ex in insert_lib.examples(run_cfg, [chunk], stats=policy.statistics[0])}
    assert len(want) == summary["inserted"]
    got = _sample_all(server.address, cfg.replay.table, len(want), key=_content)
    assert set(got) == set(want)
    for k, ex in want.items():
      for a, b in zip(tf.nest.flatten(got[k]), tf.nest.flatten(ex)):
        np.testing.assert_array_equal(a, b)

    monkeypatch.setattr(actor_lib, "_newest_step", lambda workdir: 2)
    actor_lib.run(run, ENV, server.address, episodes=1, max_steps=8)
    rows = _rows(run)
    assert [r["episode"] for r in rows] == [1, 2, 3]
    assert os.path.isdir(os.path.join(run, "actors", "seed0", "episode_000002"))


@pytest.mark.slow
def test_a_killed_actor_loses_nothing(run, tmp_path):
  """An actor process killed (SIGKILL) while acting stops nothing else: the server
  keeps its items and answers; a restarted actor re-inserts an episode that was
  kept but not logged, removes the killed writer's leftovers and goes on after
  the earlier episodes."""
  import signal
  import subprocess
  import sys
  import time
  from conftest import REPO
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  out = os.path.join(run, "actors", "killed")
  with ReplayServer(cfg) as server:
    proc = subprocess.Popen([sys.executable, "-m", "qsft_vla.replay.actor", f"--workdir={run}",
                             f"--env={ENV}", f"--server={server.address}", "--id=killed",
                             "--max_steps=8"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
      metrics = os.path.join(out, "metrics.jsonl")
      deadline = time.time() + 240
      while not (os.path.exists(metrics) and len(_rows(run, "killed")) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    size = server.size()
    assert size > 0
    # What a kill between keeping an episode and logging it leaves: an unlogged
    # episode (the last one's row removed) and a row cut short.
    rows = _rows(run, "killed")
    with open(metrics, "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows[:-1]) + '{"episode": ')
    kept = sorted(n for n in os.listdir(out) if n.startswith("episode_"))
    logged = {r["episode"] for r in rows[:-1]}
    # The removed row's episode, and any kept after the poll and before the kill.
    unlogged = [int(n[8:]) + 1 for n in kept if int(n[8:]) + 1 not in logged]
    assert rows[-1]["episode"] in unlogged
    summary = actor_lib.run(run, ENV, server.address, episodes=1, actor_id="killed", max_steps=8)
    rows = [json.loads(line) for line in open(metrics) if line.strip().endswith("}")]
    recovered = [r for r in rows if r.get("recovered")]
    assert [r["episode"] for r in recovered] == unlogged
    assert server.size() == size + sum(r["inserted"] for r in recovered) + summary["inserted"]
    assert rows[-1]["episode"] == int(kept[-1][8:]) + 2  # after every kept episode
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no writer leftovers


def test_epsilon_replaces_actions_with_random_ones():
  class Fixed:
    spec = robot_spec("babyai")
    calls = 0

    def reset(self, instruction=None):
      del instruction

    def act(self, observation):
      del observation
      Fixed.calls += 1
      return np.asarray([3.0], np.float32)

  never = actor_lib.EpsilonController(Fixed(), 0.0, seed=0)
  never.reset("go")
  assert all(never.act({})[0] == 3.0 for _ in range(50))
  always = actor_lib.EpsilonController(Fixed(), 1.0, seed=0)
  always.reset("go")
  actions = [float(always.act({})[0]) for _ in range(200)]
  values = set(Fixed.spec.action_dims[0].values)
  assert set(actions) <= values and len(set(actions)) == len(values)
  assert Fixed.calls == 250  # the Controller saw every step (its history stays whole)
  with pytest.raises(ValueError, match="epsilon must be in"):
    actor_lib.EpsilonController(Fixed(), 1.5, seed=0)


def test_a_table_of_another_layout_is_refused_before_acting(run, tmp_path):
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  cfg.data.window = 3
  with ReplayServer(cfg) as server:
    with pytest.raises(ValueError, match="the table's history_mask is bool\[3\]"):
      actor_lib.run(run, ENV, server.address, episodes=1, actor_id="other")
  assert not os.path.exists(os.path.join(run, "actors", "other"))  # nothing was acted


def test_no_checkpoint_is_a_clear_error(tmp_path):
  from qsft_vla.errors import CheckpointError
  with pytest.raises(CheckpointError, match="no checkpoint appeared within 0.1 s"):
    actor_lib.run(str(tmp_path), ENV, "localhost:1", episodes=1, wait_s=0.1)
