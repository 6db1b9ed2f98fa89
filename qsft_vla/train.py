"""The training binary: Q-SFT, BC or filtered BC from RLDS datasets.

  python -m qsft_vla.train --config=robot_configs/babyai.py:qsft --workdir=/tmp/run \
      [--config.learner.beta=4] [--config.train.num_steps=2000] ...

One plain loop (big_vision style): build everything from the config, restore
the latest checkpoint of the workdir if there is one (params, optimiser
state, step and data position), then repeat: next batch -> learner step ->
every log_every steps metrics (metrics.jsonl, TensorBoard, a progress line
with rate and ETA) -> every checkpoint_every steps and at the end an orbax
checkpoint -> every eval.every steps (optional) closed-loop evaluation in the
simulator through the same Controller a robot host uses.

Determinism: the model is initialised from `seed` alone (not from a data
batch), the data pipeline is seeded and, with data.deterministic, ordered; so
on CPU the same config and seed give the same losses, and a run killed at any
moment and restarted from its workdir logs the same losses as one that was
never interrupted (tests/test_train.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (its C++ start-up lines)

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from qsft_vla import config as qconfig
from qsft_vla import paths
from qsft_vla.learning import learner as learner_lib
from qsft_vla.learning import sharding
from qsft_vla.models import lora, registry
from qsft_vla.policy import checkpoints, layout
from qsft_vla.policy.bundle import TrainedPolicy
from qsft_vla.data.episode import DataError
from qsft_vla.errors import TrainingError  # noqa: F401 (re-exported: train.TrainingError)
from qsft_vla.robot import RobotSpec
from qsft_vla.tokenizers.action import ActionTokenizer
from qsft_vla.tokenizers.text import TextTokenizer
from qsft_vla.training import batches as batches_lib
from qsft_vla.training import data_iterator
from qsft_vla.training import distributed
from qsft_vla.training import metrics as metrics_lib
from qsft_vla.training import q_gap

CONFIG_JSON = "config.json"


@dataclasses.dataclass
class Setup:
  """Everything a run is built from, except the data iterator and the state:
  the config, the policy being trained (a TrainedPolicy without params: model,
  learner config, tokenizers, robot, image sizes, the datasets and their
  statistics) and the learner that trains it."""
  config: Any
  policy: TrainedPolicy
  learner: learner_lib.Learner

  @property
  def data_dirs(self) -> tuple[str, ...]:
    return tuple(d["dir"] for d in self.policy.datasets)

  @property
  def data_weights(self) -> np.ndarray:
    return np.asarray([d["weight"] for d in self.policy.datasets], np.float64)

  @property
  def stats(self) -> list[Optional[dict[str, Any]]]:
    return self.policy.statistics

  def meta(self) -> dict[str, Any]:
    return self.policy.meta()

  def init_state(self, pretrained: bool = True) -> learner_lib.TrainState:
    """The initial state from config.seed alone (zero inputs give the shapes).
    pretrained=False keeps a random init even where the config loads weights
    (benchmarks: timing needs the architecture, not the values). With LoRA the
    pretrained weights are the frozen base, and the policy records its identity
    (written into every checkpoint's meta)."""
    policy = self.policy
    inputs = registry.example_inputs(policy.model_config, policy.image_sizes)
    obs, hm, ti, tm, tok = inputs
    example = {"observation": obs, "history_mask": hm, "next_observation": obs,
               "next_history_mask": hm, "text_ids": ti, "text_mask": tm, "action_tokens": tok,
               "reward": np.zeros(1, np.float32), "terminal": np.zeros(1, bool),
               "has_next": np.zeros(1, bool)}
    rng = jax.random.PRNGKey(self.config.seed)
    name = policy.model_name
    if not registry.uses_pretrained(name, policy.model_config):
      return self.learner.init(rng, example)
    # The rng split Learner.init does, then the model's own (pretrained)
    # init, so pi_phi, p_theta and the target all start from the weights.
    init_rng, _ = jax.random.split(rng)
    variables = registry.init_variables(name, policy.model, init_rng, inputs, pretrained)
    if not self.learner.lora:
      return self.learner.init(rng, example, variables)
    paths = lora.paths(registry.pretrained_params(name, policy.model_config))
    state = self.learner.init(rng, example, variables, pretrained=paths)
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(state.base)):
      self.policy = dataclasses.replace(policy, lora_base=policy.base_identity(state.base))
    return state


def _devices_line(mesh, state) -> str:
  """"1 device(s)", or with FSDP the mesh and the state's bytes on the fullest device."""
  if mesh.devices.size == 1:
    return "1 device(s)"
  held = sharding.bytes_per_device(state)
  total = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(state))
  return (f"{mesh.devices.size} devices (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}), "
          f"state {max(held.values()) / 2**20:.1f} of {total / 2**20:.1f} MiB per device")


def learner_config(cfg) -> learner_lib.LearnerConfig:
  fields = dict(cfg.learner.items())
  # Donation saves a copy of the state on accelerators; the CPU backend cannot donate.
  fields["donate_state"] = jax.default_backend() != "cpu"
  try:
    return learner_lib.LearnerConfig.from_dict(fields)
  except ValueError as e:
    raise qconfig.ConfigError(f"learner: {e}") from None


def build(cfg, stats: Optional[list[dict[str, Any]]] = None) -> Setup:
  """Reads statistics, builds tokenizers, model and learner for a validated config.

  stats: the datasets' statistics if already known (benchmarks pass [None]
  for a robot whose action bounds are all in its config: no data needed).
  """
  dirs, weights = qconfig.data_sources(cfg.data)
  weights = np.asarray(weights, np.float64)
  spec = RobotSpec.from_config(cfg.robot)
  if stats is None:
    # Imported here (TensorFlow): building a run for known statistics, as the
    # benchmarks do on machines without TensorFlow, needs no dataset code.
    from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
    stats = [statistics.load_or_compute(d, spec, cfg.data.split) for d in dirs]
  # Bounds a continuous dimension takes from data (low/high None) come from the
  # first mixture member: one action space for the whole run.
  action_tokenizer = ActionTokenizer.from_robot(spec, stats[0])
  text_tokenizer = registry.text_tokenizer(cfg)
  image_sizes = {c.name: (tuple(cfg.data.image_size) if cfg.data.image_size is not None
                          else (c.height, c.width)) for c in spec.cameras}
  lcfg = learner_config(cfg)
  model_cfg = registry.model_config(cfg, spec, action_tokenizer, lcfg,
                                    text_vocab=text_tokenizer.vocab_size)
  if lcfg.uses_lora and not registry.uses_pretrained(cfg.model.name, model_cfg):
    raise qconfig.ConfigError(
        f"learner.lora_rank={lcfg.lora_rank}: LoRA adapts pretrained weights, and model "
        f"{cfg.model.name!r} with this config loads none (use a pretrained backbone, e.g. the "
        f"variants rt1_pretrained or vlm_smollm2)")
  model = registry.build(cfg.model.name, model_cfg)
  devices = np.array(jax.devices())  # every process's, with several processes
  if cfg.train.batch_size % devices.size:
    raise qconfig.ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by "
                              f"the {devices.size} devices of the mesh")
  try:
    mesh = sharding.make_mesh(devices, cfg.train.fsdp)
  except ValueError as e:
    raise qconfig.ConfigError(str(e)) from None
  learner = learner_lib.Learner(model, lcfg, action_tokenizer.valid_mask(), mesh=mesh,
                                sharding_rules=tuple(cfg.train.sharding_rules))
  policy = TrainedPolicy(
      model_name=cfg.model.name, model=model, model_config=model_cfg, learner=lcfg,
      action_tokenizer=action_tokenizer, text_tokenizer=text_tokenizer, robot=spec,
      image_sizes=image_sizes, config=qconfig.as_dict(cfg),
      datasets=tuple({"dir": d, "weight": float(w), "statistics": s}
                     for d, w, s in zip(dirs, weights, stats)))
  return Setup(cfg, policy, learner)


def _state_items(state: learner_lib.TrainState) -> dict[str, Any]:
  return {**{g: getattr(state, g) for g in layout.GROUPS},
          checkpoints.OPT: {"opt_pi": state.opt_pi, "opt_p": state.opt_p, "step": state.step,
                            "rng": state.rng}}


def _from_items(items: dict[str, Any], base) -> learner_lib.TrainState:
  """The state of restored checkpoint items; `base`: LoRA's frozen weights (never
  checkpointed: the initial state's)."""
  opt = items[checkpoints.OPT]
  return learner_lib.TrainState(step=opt["step"], **{g: items[g] for g in layout.GROUPS},
                                opt_pi=opt["opt_pi"], opt_p=opt["opt_p"], rng=opt["rng"],
                                base=base)


def _check_chunks(cfg, lcfg) -> None:
  """Chunked batches (learner.chunk_length > 1) come from the RLDS pipeline, in
  whole chunks per process and per microbatch."""
  chunk = lcfg.chunk_length
  if chunk == 1:
    return
  if cfg.data.source == "reverb":
    raise qconfig.ConfigError(
        f"learner.chunk_length={chunk} needs batches of consecutive steps, which the RLDS "
        "pipeline builds; replay (data.source='reverb') samples single steps: set "
        "learner.chunk_length=1 or data.source='rlds'")
  per_call = cfg.train.batch_size // distributed.count() // lcfg.microbatches
  if per_call % chunk or cfg.train.batch_size % (distributed.count() * lcfg.microbatches):
    raise qconfig.ConfigError(
        f"learner.chunk_length={chunk}: train.batch_size={cfg.train.batch_size} over "
        f"{distributed.count()} process(es) and learner.microbatches={lcfg.microbatches} "
        f"gives {per_call} rows per microbatch, not whole chunks")


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """A workdir resumes only the run it holds: same model, learner, action space
  and (LoRA) frozen base. Both sides are read back through their loaders first, so
  a field added by a later version at its default does not block a resume."""
  saved, current = _normalised(saved), _normalised(current)
  for key in ("model", "learner", "action_tokenizer", "lora_base"):
    a, b = dict(saved.get(key) or {}), dict(current.get(key) or {})
    if key == "learner":  # how the step is computed does not change the run
      for field in ("donate_state", "microbatches"):
        a.pop(field, None)
        b.pop(field, None)
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
      raise checkpoints.CheckpointError(
          f"{where} holds a checkpoint with a different {key} than this config; use a new "
          f"--workdir (or the original config) to resume.\n saved:   {a}\n current: {b}")


def _normalised(meta: dict[str, Any]) -> dict[str, Any]:
  """The meta's model and learner as their loaders read them (missing fields at
  their defaults, tuples as lists; the learner without its fields that have no
  effect, e.g. LoRA's settings in a run without LoRA); unreadable parts are left
  for the comparison to report."""
  out = dict(meta)
  try:
    _, model_cfg = registry.from_description(meta["model"])
    out["model"] = registry.describe(meta["model"]["name"], model_cfg)
  except (KeyError, TypeError, ValueError):
    pass
  try:
    learner = learner_lib.LearnerConfig.from_dict(meta["learner"])
    inert = learner.fields_without_effect()
    out["learner"] = {k: v for k, v in learner.to_dict().items() if k not in inert}
  except (KeyError, TypeError, ValueError):
    pass
  return json.loads(json.dumps(out))


def filter_thresholds(setup: Setup) -> Optional[list[float]]:
  """Filtered BC's one filter: per dataset, the return at or above which an episode
  is kept (statistics.filter_threshold of learner.filter_quantile); the pipeline
  drops the other episodes before batching. None for the other algorithms."""
  cfg = setup.config
  if cfg.learner.algorithm != "filtered_bc":
    return None
  from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
  thresholds = [statistics.filter_threshold(s, cfg.learner.filter_quantile) for s in setup.stats]
  for d, t, s in zip(setup.data_dirs, thresholds, setup.stats):
    q = s["episode_return"]["quantiles"]
    kept = float(np.mean([float(q[k]) >= t for k in q]))  # on the 0.05 grid
    lowest = s["episode_return"]["min"]
    rule = (f"return > {lowest:.4g} (the {cfg.learner.filter_quantile:.2f} quantile is the "
            "lowest return)" if t > lowest >= statistics.return_quantile(
                s, cfg.learner.filter_quantile) else
            f"return >= {t:.4g} (quantile {cfg.learner.filter_quantile:.2f})")
    logging.info("filtered BC: %s keeps episodes with %s, about %.0f%% of them", d, rule,
                 100 * kept)
  return thresholds


def evaluate_in_sim(setup: Setup, state, step: int, workdir: str) -> dict[str, float]:
  """Closed-loop evaluation of the live params through the robot-host Controller."""
  from qsft_vla.evaluation import loop  # pylint: disable=g-import-not-at-top
  from qsft_vla.policy.controller import Controller  # pylint: disable=g-import-not-at-top
  e = setup.config.eval
  live = setup.policy.with_params(jax.device_get(setup.learner.inference_params(state)),
                                  step=step)
  controller = Controller(live, beta=None, temperature=0.0, seed=setup.config.seed)
  video_dir = os.path.join(workdir, "eval_during_training", f"step{step}")
  summary, _ = loop.evaluate(e.env, controller, e.episodes, e.seed, max_steps=e.max_steps,
                             video_episodes=e.video_episodes, video_dir=video_dir,
                             progress=False)
  logging.info("eval at step %d on %s: success %.3f [%.3f, %.3f] over %d episodes", step,
               e.env, summary["success_rate"], summary["ci_low"], summary["ci_high"],
               summary["episodes"])
  return {f"eval/{k}": summary[k] for k in ("success_rate", "ci_low", "ci_high", "mean_return",
                                            "mean_length") if k in summary}


@jax.jit
def _params_finite(state) -> jax.Array:
  leaves = jax.tree_util.tree_leaves((state.params_pi, state.params_p, state.params_target))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.asarray(True)]))


class _NonFiniteGuard:
  """Stops training at the first step with a non-finite loss or gradient beyond
  `allowed` (train.max_nonfinite_steps). The learner already skips such a step
  (nothing changes), so the last checkpoint and the state are intact; a
  checkpoint is written only if every parameter is finite.

  Each call's flag is read one call late, so the host never waits on the step it
  has just dispatched (jax dispatch stays asynchronous)."""

  def __init__(self, allowed: int, workdir: str, mngr):
    self.allowed, self.workdir, self.mngr = allowed, workdir, mngr
    self.count = 0
    self._pending = None   # (step, metrics) of the previous call

  def observe(self, step: int, metrics) -> None:
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def _check(self, step: int, metrics) -> None:
    bad = int(np.sum(jax.device_get(metrics["nonfinite"])))
    if not bad:
      return
    self.count += bad
    values = {k: float(np.ravel(jax.device_get(metrics[k]))[-1]) for k in
              ("loss_pi", "loss_p", "grad_norm_pi", "grad_norm_p") if k in metrics}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    if self.count > self.allowed:
      latest = self.mngr.latest_step()
      kept = (f"the last checkpoint (step {latest}) is intact" if latest is not None
              else "no checkpoint was written")
      raise TrainingError(
          f"non-finite loss or gradient at step {step} ({shown}); stopped after {self.count} "
          f"such step(s) (train.max_nonfinite_steps={self.allowed}). Nothing non-finite was "
          f"applied or saved: {kept} in {self.workdir}. Lower the learning rates "
          "(learner.lr_pi / learner.lr_p) or check the data.")
    logging.warning("step %d: non-finite loss or gradient (%s), step skipped (%d of %d "
                    "allowed)", step, shown, self.count, self.allowed)

  def before_save(self, step: int, state) -> None:
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None
    if not bool(_params_finite(state)):
      raise TrainingError(f"parameters became non-finite before step {step}; the checkpoint "
                          f"was not written (the last one, step {self.mngr.latest_step()}, is "
                          "intact). Lower the learning rates.")


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _check_workdir(workdir: str) -> None:
  """A workdir (or its nearest existing parent) must be a writable folder, and a
  config.json in it must be one this binary wrote (it is replaced later)."""
  try:
    paths.check_writable_folder(workdir)
  except OSError as e:
    raise TrainingError(f"--workdir {workdir}: {e}") from None
  config_json = os.path.join(workdir, CONFIG_JSON)
  if os.path.lexists(config_json):
    try:
      with open(config_json, encoding="utf-8") as f:
        ours = {"robot", "learner", "train"} <= set(json.load(f))
    except (OSError, ValueError, TypeError):
      ours = False
    if not ours:
      raise TrainingError(f"--workdir {workdir}: {config_json} is not a config written by "
                          "qsft_vla.train; refusing to overwrite it (choose another --workdir)")


def train(cfg, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the metrics of the last logged step."""
  qconfig.validate(cfg, where="config")
  workdir = os.path.abspath(workdir)
  setup = build(cfg)
  tcfg = cfg.train
  spc = setup.policy.learner.steps_per_call
  for name in ("checkpoint_every", "log_every"):
    if tcfg[name] % spc:
      raise qconfig.ConfigError(f"train.{name}={tcfg[name]} must be a multiple of "
                                f"learner.steps_per_call={spc}")
  if cfg.eval.every % spc:
    raise qconfig.ConfigError(f"eval.every={cfg.eval.every} must be a multiple of "
                              f"learner.steps_per_call={spc}")
  examples = sum(int(s["num_steps"]) for s in setup.stats if s)
  if all(setup.stats) and tcfg.batch_size > examples:
    raise qconfig.ConfigError(f"train.batch_size={tcfg.batch_size} exceeds the {examples} "
                              f"training examples (steps) of {', '.join(setup.data_dirs)} "
                              f"(split {cfg.data.split!r}): every batch would repeat them")
  _check_chunks(cfg, setup.policy.learner)
  _check_workdir(workdir)

  from qsft_vla.data import pipeline  # pylint: disable=g-import-not-at-top
  thresholds = filter_thresholds(setup)
  policy = setup.policy
  # Each process reads its own share of every batch from its own stream; one
  # process reads the whole batch with config.seed, as it always has.
  local_batch = tcfg.batch_size // distributed.count()
  data_seed = cfg.seed + 1_000_003 * distributed.index()
  if cfg.data.source == "reverb":
    from qsft_vla.replay import source as replay_source  # pylint: disable=g-import-not-at-top
    it = replay_source.as_numpy_batches(cfg, policy.robot, policy.action_tokenizer,
                                        batch_size=local_batch, seed=data_seed,
                                        keep_returns=thresholds, stats=setup.stats)
    logging.info("sampling from replay table %r at %s (weight %g; the rest from data.dir)",
                 cfg.replay.table, cfg.data.reverb.server, cfg.data.reverb.weight)
  else:
    it = pipeline.as_numpy_batches(cfg.data, policy.robot, policy.action_tokenizer,
                                   gamma=policy.learner.gamma,
                                   batch_size=local_batch, seed=data_seed, train=True,
                                   validate=tcfg.validate_data, keep_returns=thresholds,
                                   stats=setup.stats, chunk_length=policy.learner.chunk_length)
  prepare = batches_lib.BatchPreparer(policy.text_tokenizer, policy.model_config.max_text_len)
  primary = distributed.is_primary()
  probe = q_gap.maybe_probe(cfg, setup, prepare) if primary else None
  if primary:
    stale = checkpoints.remove_interrupted_saves(checkpoints.directory(workdir))
    if stale:
      logging.warning("removed %d unfinished checkpoint save(s) left by an interrupted run: %s",
                      len(stale), ", ".join(stale))
  distributed.barrier("qsft_vla.train: workdir checked")
  mngr = checkpoints.manager(checkpoints.directory(workdir), keep=tcfg.keep_checkpoints,
                             item_handlers=None)
  state = setup.init_state()
  meta = setup.meta()  # after init_state: a LoRA run's meta names its base
  start = mngr.latest_step()
  if start is not None:
    def resume(at):
      _check_same_run(checkpoints.read_meta(mngr.directory, at), meta, workdir)
      return checkpoints.restore(mngr, at, _state_items(state),
                                 extra={data_iterator.ITEM: data_iterator.DataIteratorRestore(it)})
    try:
      restored = resume(start)
    except checkpoints.DamagedCheckpointError:
      # A damaged latest step (checked against its checksums) is set aside, not
      # deleted, and the run resumes from the newest intact one.
      start, skipped = checkpoints.newest_intact(mngr.directory)
      for message in skipped:
        logging.warning("damaged checkpoint: %s", message)
      for bad in [s for s in mngr.all_steps() if s > start]:
        logging.warning("set aside as %s; resuming from step %d",
                        checkpoints.set_aside(mngr.directory, bad), start)
      mngr = checkpoints.manager(checkpoints.directory(workdir), keep=tcfg.keep_checkpoints,
                                 item_handlers=None)
      restored = resume(start)
    state = _from_items(restored, state.base)
    logging.info("resumed %s at step %d (params, optimiser, data position)", workdir, start)
  # Only now, with the config accepted for this workdir: a refused config must never
  # replace the description of the checkpoints already there.
  if primary:
    _write_atomic(os.path.join(workdir, CONFIG_JSON), cfg.to_json(indent=2))
  step = int(state.step)
  writer = (metrics_lib.MetricsWriter(workdir, resume_step=step) if primary
            else metrics_lib.NullWriter())
  progress = metrics_lib.Progress(step, tcfg.num_steps)
  logging.info("training %s (%s) for %d steps, batch %d, %s; workdir %s",
               cfg.learner.algorithm, cfg.model.name, tcfg.num_steps, tcfg.batch_size,
               _devices_line(setup.learner.mesh, state), workdir)
  if distributed.count() > 1:
    logging.info("  process %d of %d: %d examples of each batch from its own data stream "
                 "(seed %d)", distributed.index(), distributed.count(), local_batch, data_seed)
  for line in policy.describe().splitlines()[1:]:  # robot, actions, model, data
    logging.info("  %s", line)
  logging.info("  metrics: %s and `tensorboard --logdir %s`; checkpoints every %d steps",
               os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard"),
               tcfg.checkpoint_every)

  def save(at_step):
    progress.pause()
    guard.before_save(at_step, state)
    try:
      checkpoints.save(mngr, at_step, _state_items(state), meta, policy.text_tokenizer,
                       extra={data_iterator.ITEM: data_iterator.DataIteratorSave(it)})
    except (OSError, ValueError, RuntimeError) as e:  # disk full, permissions, I/O errors
      previous = [s for s in mngr.all_steps() if s < at_step]
      kept = (f"the checkpoint of step {max(previous)} is intact" if previous
              else "no earlier checkpoint")
      raise TrainingError(f"saving the checkpoint of step {at_step} in {workdir} failed "
                          f"({type(e).__name__}: {e}); {kept}, and the next run removes the "
                          "unfinished save") from e
    progress.resume()

  last = {}
  data_time = 0.0
  guard = _NonFiniteGuard(tcfg.max_nonfinite_steps, workdir, mngr)
  try:
    while step < tcfg.num_steps:
      t0 = time.perf_counter()
      micro = [prepare(next(it)) for _ in range(spc)]
      data_time += time.perf_counter() - t0
      batch = micro[0] if spc == 1 else batches_lib.stack(micro)
      state, metrics = setup.learner.step(state, batch)
      step += spc
      guard.observe(step, metrics)
      if step % tcfg.log_every == 0 or step == tcfg.num_steps:
        metrics = jax.device_get(metrics)
        if spc > 1:  # per-step metrics [S]: report the logged step's own values
          metrics = {k: np.asarray(v)[-1] for k, v in metrics.items()}
        timing = progress.tick(step)
        interval = timing["steps_per_sec"] and tcfg.log_every / timing["steps_per_sec"]
        last = dict(metrics, steps_per_sec=timing["steps_per_sec"],
                    examples_per_sec=timing["steps_per_sec"] * tcfg.batch_size,
                    data_wait_fraction=min(1.0, data_time / max(interval, 1e-9)))
        data_time = 0.0
        writer.write(step, last)
        progress.log(step, timing, metrics)
      if step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps:
        save(step)
        if probe is not None:
          gap = probe(setup.learner.inference_params(state))
          writer.write(step, gap)
          logging.info("q gap at step %d: %s", step,
                       ", ".join(f"{k[6:]} {v:.3f}" for k, v in gap.items()))
      if primary and cfg.eval.every and (step % cfg.eval.every == 0 or step == tcfg.num_steps):
        progress.pause()
        writer.write(step, evaluate_in_sim(setup, state, step, workdir))
        progress.resume()
  finally:
    writer.close()
    mngr.close()
  return {"step": step, **{k: float(np.asarray(v)) for k, v in last.items()}}


# --------------------------------------------------------------------------- #
# Binary.

def _define_flags():
  """Flags exist only when this module runs as the binary, so importing it as a
  library (benchmarks, tests) defines nothing global."""
  config_flags.DEFINE_config_file(
      "config", None, "robot config file and variant: robot_configs/<robot>.py:<variant>, "
      "the variant <algorithm> (qsft, bc, filtered_bc), <backbone> (rt1_pretrained, "
      "vlm_smollm2) or <algorithm>+<backbone>; any field can be overridden, e.g. "
      "--config.learner.beta=4",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "output directory: checkpoints, metrics.jsonl, "
                      "TensorBoard; an existing one is resumed")
  flags.DEFINE_string("coordinator", None, "several processes: the address HOST:PORT of "
                      "process 0's coordinator (jax.distributed)")
  flags.DEFINE_integer("num_processes", 1, "several processes: how many train together")
  flags.DEFINE_integer("process_id", None, "several processes: this one's index, 0 to "
                       "num_processes - 1")
  flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops the libraries' lines a user should not have to read, so the log opens with
  what is trained on what: orbax's per-file INFO lines (dozens per checkpoint), TFDS's
  INFO lines on reading a dataset, jax's probes of absent backends ("Unable to
  initialize backend 'rocm'", "libtpu.so"), TF's deprecation warnings about its own
  code. Their errors, and every other library's warnings, still show."""

  # (path fragment of the logging module, the highest level dropped), Python's levels
  # (absl.logging.INFO is absl's verbosity, 0).
  RULES = (("/orbax/", std_logging.INFO), ("/tensorflow_datasets/", std_logging.INFO),
           ("/jax/_src/xla_bridge.py", std_logging.INFO),
           ("/tensorflow/python/util/deprecation.py", std_logging.WARNING))

  def filter(self, record) -> bool:
    return not any(part in record.pathname and record.levelno <= level
                   for part, level in self.RULES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  f = flags.FLAGS
  try:
    distributed.initialize(f.coordinator, f.num_processes, f.process_id)
  except ValueError as e:
    print(f"train: error: {e}", file=sys.stderr)
    sys.exit(1)
  try:
    summary = train(f.config, f.workdir)
  except (qconfig.ConfigError, checkpoints.CheckpointError, TrainingError, DataError) as e:
    # One line, as the data tools say it (a UsageError would print the flags' help first).
    print(f"train: error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info("done: %s", json.dumps(summary))


if __name__ == "__main__":
  _define_flags()
  qconfig.exit_on_bad_config_args("train", sys.argv[1:])
  app.run(main)
