"""Two training processes as one (jax.distributed on CPU, gloo): their step equals
one process's step on the same global batch, checkpoints are written once, and
the group resumes. Every process is stopped at the end, also on failure."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qsft_vla import config as qconfig
from conftest import BABYAI_CONFIG, REPO, babyai_dataset, free_port

OVERRIDES = {"data.shuffle_buffer": 16, "train.batch_size": 4, "train.checkpoint_every": 2,
             "train.log_every": 1, "eval.every": 0, "model.rt1_small.width": 32,
             "model.rt1_small.depth": 1, "model.rt1_small.num_heads": 2,
             "model.rt1_small.conv_channels": (8, 16, 16), "model.rt1_small.tokens_per_image": 2,
             "model.rt1_small.text_dim": 16}


def _flag(value):
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _group(workdir, data, steps, n=2, timeout=600, extra=()):
  """Runs `n` training processes to `steps`; returns their logs (process order)."""
  port = free_port()
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs, logs = [], []
  try:
    for i in range(n):
      log = open(os.path.join(os.path.dirname(workdir), f"process{i}.log"), "w")
      logs.append(log)
      cmd = [sys.executable, "-m", "qsft_vla.train", f"--config={BABYAI_CONFIG}",
             f"--workdir={workdir}", f"--config.data.dir={data}",
             f"--config.train.num_steps={steps}",
             *[f"--config.{k}={_flag(v)}" for k, v in OVERRIDES.items()],
             f"--coordinator=localhost:{port}", f"--num_processes={n}", f"--process_id={i}",
             *extra]
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  out = []
  for i in range(n):
    with open(os.path.join(os.path.dirname(workdir), f"process{i}.log")) as f:
      out.append(f.read())
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{out[i][-3000:]}"
  return out


def _reference_params(data, steps):
  """One process, the same two data streams concatenated into each global batch."""
  from qsft_vla import train
  from qsft_vla.data import pipeline
  from qsft_vla.training import batches as batches_lib
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  cfg.data.dir = data
  cfg.update_from_flattened_dict(OVERRIDES)
  setup = train.build(cfg)
  policy = setup.policy
  streams = [pipeline.as_numpy_batches(cfg.data, policy.robot, policy.action_tokenizer,
                                       gamma=policy.learner.gamma, batch_size=2,
                                       seed=cfg.seed + 1_000_003 * i, train=True,
                                       stats=setup.stats) for i in range(2)]
  prepare = batches_lib.BatchPreparer(policy.text_tokenizer, policy.model_config.max_text_len)
  state = setup.init_state()
  init = jax.device_get(setup.learner.inference_params(state))
  losses = []
  for _ in range(steps):
    parts = [prepare(next(s)) for s in streams]
    batch = jax.tree_util.tree_map(lambda *x: np.concatenate(x), *parts)
    state, metrics = setup.learner.step(state, batch)
    losses.append((float(metrics["loss_pi"]), float(metrics["loss_p"])))
  return init, jax.device_get(setup.learner.inference_params(state)), losses


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path_factory, tmp_path):
  from qsft_vla.policy import TrainedPolicy
  data = babyai_dataset(tmp_path_factory, episodes=3, max_steps=8)
  workdir = str(tmp_path / "run")
  logs = _group(workdir, data, steps=2)
  assert "process 1 of 2: 2 examples of each batch" in logs[1]
  assert "training qsft (rt1_small) for 2 steps, batch 4, 2 devices" in logs[0]

  # Written once: one metrics row per step, one manifest; each process's data position.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  step_dir = os.path.join(workdir, "checkpoints", "2")
  assert os.path.exists(os.path.join(step_dir, "qsft_checksums.json"))
  assert sorted(os.listdir(os.path.join(step_dir, "data_iterator"))) == ["process_0",
                                                                          "process_1"]

  init, want, losses = _reference_params(data, steps=2)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  np.testing.assert_allclose([(r["loss_pi"], r["loss_p"]) for r in rows], losses, rtol=1e-5)
  got = TrainedPolicy.load(workdir).params

  # Parameters: Adam's first steps move every weight by about lr * sign(gradient),
  # so a gradient that is rounding noise in both runs can move a weight either
  # way (max |difference| up to 2 lr). Compared as a whole, the two updates agree.
  flat = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
          for t in (got, want, init)]
  rel = np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1] - flat[2])
  assert rel < 0.02, rel

  logs = _group(workdir, data, steps=3)
  assert "resumed" in logs[0] and "at step 2" in logs[0]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


@pytest.mark.slow
def test_two_learners_and_an_actor_share_one_replay_server(tmp_path_factory, tmp_path):
  """The README's one-host layout: a server, the inserter, two learner processes
  sampling their shares from it, and an actor inserting episodes of their checkpoint."""
  from qsft_vla.replay import actor as actor_lib
  from qsft_vla.replay import insert as insert_lib
  from qsft_vla.replay.server import ReplayServer
  data = babyai_dataset(tmp_path_factory, episodes=3, max_steps=8)
  cfg = qconfig.load_config_file(BABYAI_CONFIG)
  workdir = str(tmp_path / "run")
  with ReplayServer(cfg) as server:
    offline = insert_lib.insert(cfg, [data], server.address)
    logs = _group(workdir, data, steps=2, extra=["--config.data.source=reverb",
                                                 f"--config.data.reverb.server={server.address}"])
    assert "sampling from replay table 'examples'" in logs[1]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      assert [json.loads(line)["step"] for line in f] == [1, 2]
    summary = actor_lib.run(workdir, "babyai:BabyAI-GoToLocal-v0", server.address, episodes=1,
                            max_steps=8)
    assert server.size() == offline + summary["inserted"] > offline


def test_bad_process_flags_are_refused_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "qsft_vla.train", f"--config={BABYAI_CONFIG}",
       f"--workdir={tmp_path / 'run'}", "--num_processes=2", "--process_id=0"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "train: error: --num_processes > 1 needs --coordinator=HOST:PORT" in out.stderr
