"""The training binary: checkpoints that describe themselves, resume, variants, bad configs.

A real BabyAI dataset (the bot at noise 0 and 1) and a tiny RT1Small keep each
run to a few seconds on 2 cores.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qsft_vla.policy import TrainedPolicy, checkpoints
from qsft_vla import config as qconfig
from qsft_vla import train
from qsft_vla.training import metrics as metrics_lib

from conftest import REPO, babyai_dataset, run_without_tensorflow

BABYAI = os.path.join(REPO, "robot_configs", "babyai.py")
TINY = {"model.rt1_small.conv_channels": (8, 8, 8), "model.rt1_small.width": 32,
        "model.rt1_small.depth": 1, "model.rt1_small.num_heads": 2,
        "model.rt1_small.tokens_per_image": 2, "train.batch_size": 8,
        "data.shuffle_buffer": 64, "train.log_every": 2, "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return babyai_dataset(tmp_path_factory, episodes=12, max_steps=24)


def _config(dataset, variant="qsft", **overrides):
  cfg = qconfig.load_config_file(f"{BABYAI}:{variant}")
  cfg.data.dir = dataset
  for key, value in {**TINY, **overrides}.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return cfg


def _flags(overrides):
  out = []
  for key, value in {**TINY, **overrides}.items():
    out.append(f"--config.{key}={value}")
  return out


def test_checkpoints_describe_themselves(dataset, tmp_path):
  # Separate backbones and the bootstrapped target (the BabyAI default is the shared
  # trunk with the Monte-Carlo target, which the other tests here train).
  cfg = _config(dataset, **{"train.num_steps": 4, "train.keep_checkpoints": 1,
                            "learner.architecture": "separate", "learner.mc_mix": 0.0})
  # What a save killed midway leaves (it would make the save of step 4 fail): removed.
  stale = tmp_path / checkpoints.SUBDIR / "4.orbax-checkpoint-tmp-1700000000"
  stale.mkdir(parents=True)
  (stale / "partial").write_bytes(b"\0" * 10)
  summary = train.train(cfg, str(tmp_path))
  assert sorted(os.listdir(tmp_path / checkpoints.SUBDIR)) == ["4"]
  assert summary["step"] == 4 and np.isfinite(summary["loss_p"])
  rows = metrics_lib.read_jsonl(str(tmp_path))
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("loss_pi", "loss_p", "weight_mean", "weight_std", "ratio_p_pi", "grad_norm_pi",
              "grad_norm_p", "lr_pi", "lr_p", "steps_per_sec"):
    assert key in rows[-1], key
  assert os.listdir(tmp_path / "tensorboard")

  ckpt_dir, step = checkpoints.resolve(str(tmp_path))
  assert step == 4 and sorted(os.listdir(ckpt_dir)) == ["4"]  # keep_checkpoints=1
  items = set(os.listdir(os.path.join(ckpt_dir, "4")))
  assert {"params_pi", "params_p", "params_target", "opt", "meta", "text_tokenizer",
          "data_iterator"} <= items
  meta = checkpoints.read_meta(ckpt_dir, 4)
  assert meta["config"]["learner"]["algorithm"] == "qsft"
  assert meta["action_tokenizer"]["dims"][0]["bins"] == 7
  assert meta["datasets"][0]["statistics"]["num_episodes"] == 12
  assert meta["model"]["name"] == "rt1_small" and meta["step"] == 4
  # No pickle anywhere: loading runs no code.
  for root, _, files in os.walk(tmp_path / "checkpoints"):
    for name in files:
      assert not name.endswith((".pkl", ".pickle")), name
      with open(os.path.join(root, name), "rb") as f:
        head = f.read(2)
      assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), \
          os.path.join(root, name)

  inf = TrainedPolicy.load(str(tmp_path))
  assert set(inf.params) == {"pi", "p"} and inf.step == 4
  assert inf.text_tokenizer.encode_batch(["go to the red ball"], 8)[0].shape == (1, 8)


def test_resume_continues_exactly(dataset, tmp_path):
  """4 steps, then a restart to 6, logs what one uninterrupted 6-step run logs."""
  train.train(_config(dataset, **{"train.num_steps": 4}), str(tmp_path / "a"))
  train.train(_config(dataset, **{"train.num_steps": 6}), str(tmp_path / "a"))
  train.train(_config(dataset, **{"train.num_steps": 6}), str(tmp_path / "b"))
  a = metrics_lib.read_jsonl(str(tmp_path / "a"))
  b = metrics_lib.read_jsonl(str(tmp_path / "b"))
  assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6]
  for ra, rb in zip(a, b):
    for key in ("loss_pi", "loss_p", "weight_mean", "grad_norm_p"):
      assert ra[key] == rb[key], (ra["step"], key)

  # A damaged latest step: inference refuses it by name, evaluation falls back to
  # the newest intact step, and training sets it aside (nothing deleted) and
  # resumes exactly from that step.
  c = tmp_path / "c"
  train.train(_config(dataset, **{"train.num_steps": 4}), str(c))
  params = c / "checkpoints" / "4" / "params_pi"
  target = max((os.path.join(d, f) for d, _, fs in os.walk(params) for f in fs),
               key=os.path.getsize)
  with open(target, "r+b") as f:
    f.truncate(os.path.getsize(target) // 2)
  with pytest.raises(checkpoints.CheckpointError, match=r"4: damaged.*params_pi/.*bytes"):
    TrainedPolicy.load(str(c))
  assert checkpoints.newest_intact(str(c), checkpoints.INFERENCE_ITEMS)[0] == 2
  train.train(_config(dataset, **{"train.num_steps": 6}), str(c))
  assert (c / "checkpoints" / "4.damaged-0" / "params_pi").is_dir()
  final = metrics_lib.read_jsonl(str(c))[-1]
  assert final["step"] == 6 and final["loss_p"] == b[-1]["loss_p"]


def test_a_monte_carlo_run_saved_with_a_polyak_target_resumes_without_it(dataset, tmp_path,
                                                                         monkeypatch):
  """Runs of the pure Monte-Carlo target (the config's) saved while every Q-SFT run still
  kept a Polyak target hold a params_target item: they resume, leave it unread, and
  continue exactly as a run without it."""
  from qsft_vla.policy import layout  # pylint: disable=g-import-not-at-top
  real = layout.param_groups
  monkeypatch.setattr(layout, "param_groups", lambda variables, learner: {
      **real(variables, learner), "params_target": dict(variables)})
  old, new = tmp_path / "old", tmp_path / "new"
  train.train(_config(dataset, **{"train.num_steps": 2}), str(old))
  assert (old / "checkpoints" / "2" / "params_target").is_dir()
  monkeypatch.setattr(layout, "param_groups", real)
  train.train(_config(dataset, **{"train.num_steps": 4}), str(old))
  train.train(_config(dataset, **{"train.num_steps": 4}), str(new))
  assert not (new / "checkpoints" / "4" / "params_target").exists()
  a, b = metrics_lib.read_jsonl(str(old)), metrics_lib.read_jsonl(str(new))
  assert a[-1]["step"] == b[-1]["step"] == 4 and a[-1]["loss_p"] == b[-1]["loss_p"]


def _episode_returns(cfg, setup, thresholds):
  """{episode_index: return} of every episode that reaches a (single-pass) batch."""
  from qsft_vla.data import pipeline  # pylint: disable=g-import-not-at-top
  out = {}
  policy = setup.policy
  for b in pipeline.as_numpy_batches(cfg.data, policy.robot, policy.action_tokenizer,
                                     gamma=policy.learner.gamma, batch_size=8,
                                     seed=0, train=False, validate=False,
                                     keep_returns=thresholds):
    out.update(zip(b["episode_index"].tolist(), b["episode_return"].tolist()))
  return out


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9])
def test_filtered_bc_keeps_the_episodes_its_quantile_names(dataset, quantile):
  """Filtered BC's one filter, from the config field to the batches: the episodes
  that reach training are exactly those whose return is at or above the quantile
  of the data's returns, except that a quantile at the lowest return (here half
  the episodes are the random policy and fail) keeps only the better episodes."""
  cfg = _config(dataset, "filtered_bc", **{"learner.filter_quantile": quantile})
  setup = train.build(cfg)
  assert train.learner_config(cfg).filter_quantile == quantile
  every = _episode_returns(cfg, setup, None)
  (threshold,) = train.filter_thresholds(setup)
  kept = _episode_returns(cfg, setup, [threshold])
  returns = np.array(sorted(every.values()))
  assert 0 < (returns > returns[0]).sum() < len(returns)  # some fail, some succeed
  q = float(np.quantile(returns, quantile))
  if q <= returns[0]:
    expected = {e for e, r in every.items() if r > returns[0]}
  else:
    expected = {e for e, r in every.items() if r >= q}
  assert set(kept) == expected and expected


@pytest.mark.parametrize("variant,extra", [
    ("bc", {}),
    ("filtered_bc", {}),
    ("qsft", {"learner.architecture": "shared", "learner.schedule": "sequential",
              "learner.pi_steps": 2}),
    ("qsft", {"learner.steps_per_call": 2, "learner.residual": "uniform"}),
    # Batches of consecutive steps with the bootstrapped target (the learner checks them).
    ("qsft", {"learner.chunk_length": 4, "learner.mc_mix": 0.5, "learner.backup": "max"}),
])
def test_variants_train(dataset, tmp_path, variant, extra):
  summary = train.train(_config(dataset, variant, **{"train.num_steps": 4, **extra}),
                        str(tmp_path))
  assert summary["step"] == 4 and np.isfinite(summary["loss_pi"])
  meta = checkpoints.read_meta(*checkpoints.resolve(str(tmp_path)))
  assert meta["learner"]["algorithm"] == variant
  if variant == "bc":
    assert "loss_p" not in summary and meta["config"]["learner"]["beta"] == 0.0
  if extra.get("learner.architecture") == "shared":
    assert set(TrainedPolicy.load(str(tmp_path)).params) == {"shared"}


def test_non_finite_steps_stop_training_and_nothing_non_finite_is_saved(dataset, tmp_path,
                                                                        monkeypatch):
  """From step 5 on every step is non-finite (the learner skips those: its own test):
  with max_nonfinite_steps=1 the first is logged and skipped, the second stops the run
  with a clear error; the checkpoints on disk are the finite ones of steps 2 and 4."""
  from qsft_vla.learning import learner as learner_lib  # pylint: disable=g-import-not-at-top
  real_step = learner_lib.Learner.step

  def failing_step(self, state, batch):
    new, metrics = real_step(self, state, batch)
    if int(state.step) >= 4:
      metrics = dict(metrics, nonfinite=np.float32(1.0), loss_p=np.float32(np.nan))
    return new, metrics

  monkeypatch.setattr(learner_lib.Learner, "step", failing_step)
  cfg = _config(dataset, **{"train.num_steps": 10, "train.max_nonfinite_steps": 1})
  with pytest.raises(train.TrainingError, match=r"non-finite loss or gradient at step 6.*"
                     r"loss_p=nan.*last checkpoint \(step 4\) is intact"):
    train.train(cfg, str(tmp_path))
  mngr = checkpoints.manager(checkpoints.directory(str(tmp_path)), read_only=True)
  assert list(mngr.all_steps()) == [2, 4]
  for line in (tmp_path / metrics_lib.JSONL).read_text().splitlines():
    assert "NaN" not in line  # strict JSON: null


def test_workdir_and_batch_size_are_checked_before_anything_is_written(dataset, tmp_path):
  (tmp_path / "file").write_text("mine")
  with pytest.raises(train.TrainingError, match=r"file is a file, not a folder"):
    train.train(_config(dataset, **{"train.num_steps": 2}), str(tmp_path / "file" / "run"))
  assert (tmp_path / "file").read_text() == "mine"
  with pytest.raises(qconfig.ConfigError, match=r"train.batch_size=100000 exceeds the \d+ "
                     r"training examples"):
    train.train(_config(dataset, **{"train.num_steps": 2, "train.batch_size": 100_000}),
                str(tmp_path / "big"))
  assert not (tmp_path / "big").exists()


def test_chunked_batches_need_the_pipeline_and_whole_chunks(dataset, tmp_path):
  with pytest.raises(qconfig.ConfigError, match=r"learner.chunk_length=3: .* gives 8 rows per "
                     r"microbatch, not whole chunks"):
    train.train(_config(dataset, **{"train.num_steps": 2, "learner.chunk_length": 3}),
                str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()
  cfg = _config(dataset, **{"learner.chunk_length": 4, "data.source": "reverb"})
  with pytest.raises(qconfig.ConfigError, match=r"replay \(data.source='reverb'\) samples "
                     "single steps"):
    train._check_chunks(cfg, train.learner_config(cfg))


def test_a_failed_save_stops_with_a_clear_error(dataset, tmp_path, monkeypatch):
  """Disk full while saving: one TrainingError naming the step and the intact one."""
  real_save = checkpoints.save

  def full_disk(mngr, step, *args, **kwargs):
    if step >= 4:
      raise OSError(28, "No space left on device")
    return real_save(mngr, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints, "save", full_disk)
  with pytest.raises(train.TrainingError, match=r"step 4 .* failed \(OSError: \[Errno 28\] "
                     r"No space left on device\); the checkpoint of step 2 is intact"):
    train.train(_config(dataset, **{"train.num_steps": 6}), str(tmp_path))


def test_other_config_does_not_resume(dataset, tmp_path):
  train.train(_config(dataset, **{"train.num_steps": 2}), str(tmp_path))
  saved = (tmp_path / train.CONFIG_JSON).read_bytes()
  with pytest.raises(checkpoints.CheckpointError, match="different model"):
    train.train(_config(dataset, **{"train.num_steps": 4, "model.rt1_small.width": 48}), str(tmp_path))
  # The refused config did not replace the one that describes the checkpoints.
  assert (tmp_path / train.CONFIG_JSON).read_bytes() == saved


def _run_binary(args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "qsft_vla.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, **kwargs)


def test_override_names_are_checked_without_running():
  cfg = f"--config={BABYAI}:bc"
  assert qconfig.check_config_args([cfg, "--config.learner.beta=2",
                                  "--config.robot.cameras.image.height=56"]) is None
  msg = qconfig.check_config_args([cfg, "--config.learner.beta.x=2"])
  assert "learner.beta.x is not a field" in msg and "no sub-fields" in msg
  assert "has: " in qconfig.check_config_args([cfg, "--config.train.bogus", "1"])


@pytest.mark.slow
def test_kill_9_and_resume_logs_the_same_losses(dataset, tmp_path):
  """kill -9 mid-run (after a checkpoint, during later steps), restart the same
  command: the losses logged at the final step equal an uninterrupted run's."""
  overrides = {"train.num_steps": 16, "train.checkpoint_every": 4, "train.log_every": 4}
  args = [f"--config={BABYAI}:qsft", f"--config.data.dir={dataset}", *_flags(overrides)]

  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "qsft_vla.train", *args, f"--workdir={killed}"],
                          cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpts = killed / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(n.isdigit() and int(n) >= 8 for n in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "training finished before it could be killed; make it longer"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_at_kill = [r["step"] for r in metrics_lib.read_jsonl(str(killed))]
  assert max(steps_at_kill) < 16

  r = _run_binary([*args, f"--workdir={killed}"], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed" in r.stderr
  r = _run_binary([*args, f"--workdir={tmp_path / 'straight'}"], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  # The log opens with what is trained on what, not with the libraries' start-up lines.
  assert "training qsft (rt1_small) for 16 steps" in r.stderr.splitlines()[0], r.stderr[:3000]
  for noise in ("Unable to initialize backend", "libtpu", "differ on disk", "deprecated"):
    assert noise not in r.stderr, noise

  a = metrics_lib.read_jsonl(str(killed))
  b = metrics_lib.read_jsonl(str(tmp_path / "straight"))
  assert [x["step"] for x in a] == [x["step"] for x in b] == [4, 8, 12, 16]
  for key in ("loss_pi", "loss_p"):
    assert a[-1][key] == b[-1][key], key


def test_build_for_known_statistics_needs_no_tensorflow():
  """Benchmarks build a run on machines without TensorFlow (GPU hosts)."""
  out = run_without_tensorflow("""
      from qsft_vla import config, train
      cfg = config.load_config_file("robot_configs/babyai.py")
      cfg.data.dir = "unused"
      setup = train.build(cfg, stats=[None])
      print("BUILT", type(setup.policy.model).__name__)
  """)
  assert "BUILT RT1Small" in out


def test_binary_log_filter_drops_the_libraries_noise_only():
  import logging as std_logging
  quiet = train._QuietLibraries()  # pylint: disable=protected-access

  def kept(level, path):
    return quiet.filter(std_logging.LogRecord("absl", level, path, 1, "msg", None, None))

  site = "/venv/lib/python3.11/site-packages"
  assert not kept(std_logging.INFO, f"{site}/orbax/checkpoint/x.py")
  assert kept(std_logging.WARNING, f"{site}/orbax/checkpoint/x.py")
  assert not kept(std_logging.INFO, f"{site}/tensorflow_datasets/core/dataset_info.py")
  assert kept(std_logging.WARNING, f"{site}/tensorflow_datasets/core/dataset_info.py")
  assert not kept(std_logging.INFO, f"{site}/jax/_src/xla_bridge.py")
  assert not kept(std_logging.WARNING, f"{site}/tensorflow/python/util/deprecation.py")
  assert kept(std_logging.ERROR, f"{site}/tensorflow/python/util/deprecation.py")
  assert kept(std_logging.INFO, "/work/qsft_vla/train.py")


def test_a_run_saved_before_a_field_existed_resumes_at_its_default():
  """A later version's new model or learner field, at its default, does not block a
  resume; at another value it does."""
  from qsft_vla.learning import spec  # pylint: disable=g-import-not-at-top
  from qsft_vla.models import registry  # pylint: disable=g-import-not-at-top
  from qsft_vla.models.rt1_small import RT1SmallConfig  # pylint: disable=g-import-not-at-top
  current = {"model": registry.describe("rt1_small", RT1SmallConfig(4, 256)),
             "learner": spec.LearnerConfig(gamma=0.9).to_dict()}
  saved = json.loads(json.dumps(current))
  del saved["model"]["config"]["compute_dtype"], saved["learner"]["sample_proposal"]
  train._check_same_run(saved, current, "run")
  with pytest.raises(checkpoints.CheckpointError, match="different model"):
    train._check_same_run(saved, {**current, "model": registry.describe(
        "rt1_small", RT1SmallConfig(4, 256, compute_dtype="bfloat16"))}, "run")
  with pytest.raises(checkpoints.CheckpointError, match="different learner"):
    train._check_same_run(saved, {**current, "learner": spec.LearnerConfig(
        gamma=0.9, sample_proposal="pi").to_dict()}, "run")
  # A changed default of a field without effect (LoRA's targets without LoRA) does
  # not block either; with LoRA on both sides it does.
  old_targets = {**saved["learner"], "lora_targets": "(q_proj|v_proj)/kernel$"}
  train._check_same_run({**saved, "learner": old_targets}, current, "run")
  lora = lambda d: {**d, "lora_rank": 8}
  with pytest.raises(checkpoints.CheckpointError, match="different learner"):
    train._check_same_run({**saved, "learner": lora(old_targets)},
                          {**current, "learner": lora(current["learner"])}, "run")


def test_shared_encoder_variant_builds_p_theta_its_own_transformer():
  """`+shared_encoder` is Q-SFT's cheaper architecture: the model gets p_theta's own
  transformer (rt1_small's p_trunk); a backbone without an encoder apart from its
  transformer is refused at build, naming the field and the model."""
  cfg = qconfig.load_config_file(f"{BABYAI}:qsft+shared_encoder")
  assert cfg.learner.architecture == "shared_encoder"
  cfg.data.dir = "unused"
  setup = train.build(cfg, stats=[None])
  assert setup.policy.model_config.p_trunk and setup.policy.model_config.num_output_heads == 2
  bc = qconfig.load_config_file(f"{BABYAI}:bc+shared_encoder")  # nothing to share: one network
  bc.data.dir = "unused"
  assert not train.build(bc, stats=[None]).policy.model_config.p_trunk
  vlm = qconfig.load_config_file(f"{BABYAI}:vlm_smollm2+shared_encoder")
  vlm.data.dir = "unused"
  with pytest.raises(qconfig.ConfigError, match=r"model\.vlm: learner\.architecture="
                                                r"'shared_encoder' needs .*rt1_small"):
    train.build(vlm, stats=[None])


def test_pi_head_variant_detaches_pi_phi_on_either_backbone():
  """`+pi_head` makes pi_phi a head on p_theta's network: the model gets two heads and the
  stop-gradient in front of head 0, on rt1_small and on the VLM alike; BC has one network."""
  for variant in ("qsft+pi_head", "vlm_smollm2+pi_head"):
    cfg = qconfig.load_config_file(f"{BABYAI}:{variant}")
    assert cfg.learner.architecture == "pi_head"
    cfg.data.dir = "unused"
    mc = train.build(cfg, stats=[None]).policy.model_config
    assert mc.detach_head0 and mc.num_output_heads == 2, variant
  bc = qconfig.load_config_file(f"{BABYAI}:bc+pi_head")
  bc.data.dir = "unused"
  mc = train.build(bc, stats=[None]).policy.model_config
  assert not mc.detach_head0 and mc.num_output_heads == 1
