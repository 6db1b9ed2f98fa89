"""Reverb replay (qsft_vla/replay): a real server on a free localhost port, the
inserter, the table's signature, and a checkpoint restored by a new server."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from qsft_vla import config as qconfig
from qsft_vla.replay import insert as insert_lib
from qsft_vla.replay.server import ReplayServer

from conftest import BABYAI_CONFIG, REPO, babyai_dataset, free_port


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return babyai_dataset(tmp_path_factory, episodes=3, max_steps=8)


def _cfg(**replay):
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  cfg.replay.update(replay)
  return cfg


def _key(ex):
  return (int(ex["dataset_index"]), int(ex["episode_index"]), int(ex["step_index"]))


def _sample_all(address, table, n, key=_key):
  """Every item of a uniform table, by sampling until each was seen (told apart by `key`)."""
  import reverb
  client = reverb.Client(address)
  seen = {}
  for _ in range(50):
    for s in client.sample(table, num_samples=4 * n, emit_timesteps=False,
                           unpack_as_table_signature=True):
      data = tf.nest.map_structure(np.asarray, s.data)
      seen[key(data)] = data
    if len(seen) == n:
      break
  return seen


def test_inserted_examples_are_the_pipelines_examples(dataset):
  cfg = _cfg()
  want = {_key(ex): ex for ex in insert_lib.examples(_cfg(), [dataset])}
  with ReplayServer(cfg) as server:
    count = insert_lib.insert(cfg, [dataset], server.address)
    assert count == len(want) == server.size()
    got = _sample_all(server.address, cfg.replay.table, count)
  assert set(got) == set(want)
  for k, ex in want.items():
    tf.nest.assert_same_structure(got[k], ex)
    for a, b in zip(tf.nest.flatten(got[k]), tf.nest.flatten(ex)):
      np.testing.assert_array_equal(a, b)


def test_a_table_of_another_layout_is_refused_naming_the_key(dataset):
  other = _cfg()
  other.data.window = 2
  with ReplayServer(other) as server:
    with pytest.raises(ValueError, match=r"history_mask is bool\[2\] but .* bool\[1\]"):
      insert_lib.insert(_cfg(), [dataset], server.address)
    assert server.size() == 0


def test_checkpoint_restores_the_table(dataset, tmp_path):
  cfg = _cfg()
  ckpt = str(tmp_path / "replay")
  with ReplayServer(cfg, checkpoint_dir=ckpt, checkpoint_every=0) as server:
    count = insert_lib.insert(cfg, [dataset], server.address)
  # Stopped with a final checkpoint; a new server on the folder starts full.
  with ReplayServer(cfg, checkpoint_dir=ckpt, checkpoint_every=0) as again:
    assert again.size() == count


@pytest.mark.parametrize("replay, match", [
    (dict(sampler="lifo"), "replay.sampler"),
    (dict(min_size_to_sample=10, max_size=5), "could never start"),
    (dict(rate_limiter="sample_to_insert", samples_per_insert=0.0), "samples_per_insert"),
    (dict(rate_limiter="sample_to_insert", samples_per_insert=8.0, error_buffer=4.0),
     r"error_buffer=4 must be at least max\(1, replay.samples_per_insert\)=8.*deadlock"),
])
def test_bad_replay_config_is_refused(replay, match):
  with pytest.raises(qconfig.ConfigError, match=match):
    qconfig.validate(_cfg(**replay))


def test_binaries_refuse_bad_flags_in_one_line(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-m", "qsft_vla.replay.server",
                         f"--config={BABYAI_CONFIG}", "--config.replay.bogus=1"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "replay.bogus" in proc.stderr, proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, "-m", "qsft_vla.replay.insert",
                         f"--config={BABYAI_CONFIG}", f"--data={tmp_path / 'none'}",
                         "--server=localhost:1"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "replay.insert: error:" in proc.stderr, proc.stderr[-2000:]
  assert "none" in proc.stderr, proc.stderr[-2000:]   # the missing dataset, named


def test_an_absent_server_is_a_clear_error(dataset):
  port = free_port()
  with pytest.raises(ConnectionError, match=f"localhost:{port}: no replay server answered"):
    insert_lib.insert(_cfg(), [dataset], f"localhost:{port}", timeout=1)


@pytest.mark.slow
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_training_samples_from_the_table(dataset, tmp_path, weight):
  """Two training steps from replay (alone, and mixed half and half with data.dir),
  a checkpoint, and a resumed run that samples afresh."""
  from qsft_vla import train
  cfg = _cfg()
  with ReplayServer(cfg) as server:
    insert_lib.insert(cfg, [dataset], server.address)
    run = _cfg()
    run.data.dir = dataset
    run.data.shuffle_buffer = 16
    run.data.source = "reverb"
    run.data.reverb.server = server.address
    run.data.reverb.weight = weight
    run.model.rt1_small.update(width=32, depth=1, num_heads=2, conv_channels=(8, 16, 16),
                               tokens_per_image=2, text_dim=16)
    run.train.update(num_steps=2, batch_size=4, checkpoint_every=2, log_every=1)
    summary = train.train(run, str(tmp_path / "run"))
    assert summary["step"] == 2 and np.isfinite(summary["loss_pi"])
    run.train.num_steps = 3
    assert train.train(run, str(tmp_path / "run"))["step"] == 3


def test_an_empty_table_is_a_clear_training_error(dataset, tmp_path):
  from qsft_vla import train
  from qsft_vla.errors import TrainingError
  cfg = _cfg()
  with ReplayServer(cfg) as server:
    run = _cfg()
    run.data.dir = dataset
    run.data.source = "reverb"
    run.data.reverb.server = server.address
    run.data.reverb.timeout_s = 1.0
    run.model.rt1_small.update(width=32, depth=1, num_heads=2, conv_channels=(8, 16, 16),
                               tokens_per_image=2, text_dim=16)
    run.train.update(num_steps=2, batch_size=4, checkpoint_every=2, log_every=1)
    with pytest.raises(TrainingError, match=f"'examples' at {server.address} within 1 s"):
      train.train(run, str(tmp_path / "run"))


@pytest.mark.slow
def test_sampling_survives_a_server_restart(dataset, tmp_path, caplog):
  """The server stops (final checkpoint) and a new one starts on the same port
  from that checkpoint 2 s later: the next batch comes after logged retries."""
  import logging
  import threading
  from qsft_vla.replay import source
  cfg = _cfg()
  ckpt = str(tmp_path / "replay")
  port = free_port()
  server = ReplayServer(cfg, port=port, checkpoint_dir=ckpt, checkpoint_every=0)
  insert_lib.insert(cfg, [dataset], server.address)
  run = _cfg()
  run.data.dir = dataset
  run.data.source = "reverb"
  run.data.reverb.server = server.address
  run.data.reverb.timeout_s = 60.0   # a stalled stream is replaced after 15 s
  from qsft_vla.robot import RobotSpec
  from qsft_vla.tokenizers.action import ActionTokenizer
  spec = RobotSpec.from_config(run.robot)
  it = source.as_numpy_batches(run, spec, ActionTokenizer.from_robot(spec), batch_size=4, seed=0)
  assert next(it)["reward"].shape == (4,)
  server.stop()                                   # writes its final checkpoint
  restarted = {}
  timer = threading.Timer(2.0, lambda: restarted.setdefault(
      "server", ReplayServer(cfg, port=port, checkpoint_dir=ckpt, checkpoint_every=0)))
  timer.start()
  try:
    with caplog.at_level(logging.WARNING):
      for _ in range(40):  # past the batches buffered before the stop
        assert next(it)["reward"].shape == (4,)
    assert "retrying" in caplog.text
    assert restarted["server"].size() > 0
  finally:
    timer.join()
    if "server" in restarted:
      restarted["server"].stop(final_checkpoint=False)
