"""The config schema: every field a config file may set, with its default.

A config file (robot_configs/<robot>.py) starts from `base_config()`, which is
locked: assigning a field the schema does not have fails with the field named.
Fields a robot must set are `REQUIRED` and `validate()` names any left unset.
Each schema is defined once: the sections robot, data, train and eval here;
learner and model.<backbone> are built from the dataclasses the code reads
(learning/spec.LearnerConfig, models/rt1_small.RT1SmallConfig,
models/vlm.VLMConfig), whose fields and comments say what can be configured.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from typing import Any, Optional

import ml_collections

from qsft_vla import robot
from qsft_vla.learning import sharding
from qsft_vla.learning import spec as learner_spec
# Re-exported: config files and callers catch qconfig.ConfigError.
from qsft_vla.errors import ConfigError, check_dataclass_fields  # noqa: F401

# Placeholder for fields a config file must set; a string so ConfigDict types it.
REQUIRED = "<required>"



def continuous_dim(low: float | None = None, high: float | None = None,
                   bins: int = 256) -> ml_collections.ConfigDict:
  """A continuous action dimension. low/high None: bounds from dataset q01/q99."""
  return ml_collections.ConfigDict(
      {"kind": "continuous", "low": low, "high": high, "bins": bins,
       "values": None, "labels": None},
      type_safe=False)


def discrete_dim(values, labels=None) -> ml_collections.ConfigDict:
  """A discrete dimension: the action takes one of `values` (e.g. gripper)."""
  return ml_collections.ConfigDict(
      {"kind": "discrete", "low": None, "high": None, "bins": len(values),
       "values": tuple(float(v) for v in values),
       "labels": None if labels is None else tuple(labels)},
      type_safe=False)


def robot_defaults() -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.name = REQUIRED
  r.control_hz = 0.0            # steps per second on the real robot / simulator
  # Camera name -> stored image size. The name is the key in the controller's
  # observation dict and (through rlds_keys.cameras) in the dataset.
  r.cameras = ml_collections.ConfigDict(type_safe=False)
  r.state_dim = 0               # proprio/state vector length; 0 = not used
  r.instruction = ml_collections.ConfigDict()
  r.instruction.source = "step"   # "step": language_instruction of each step; "fixed": below
  r.instruction.text = ""
  r.action = ml_collections.ConfigDict()
  r.action.names = ()           # order of the action dimensions (= token order)
  r.action.dims = ml_collections.ConfigDict(type_safe=False)  # name -> *_dim()
  r.action.out_of_bounds = "clip"  # "clip" (and count) or "reject"
  # Where our canonical step keys live in an RLDS step ("/" separates nesting),
  # so any RLDS dataset (e.g. Open X-Embodiment) loads with a mapping only.
  k = r.rlds_keys = ml_collections.ConfigDict()
  k.cameras = ml_collections.ConfigDict(type_safe=False)  # camera name -> key
  k.state = "observation/state"
  k.action = "action"
  k.reward = "reward"
  k.discount = "discount"
  k.is_first = "is_first"
  k.is_last = "is_last"
  k.is_terminal = "is_terminal"
  k.language_instruction = "language_instruction"
  return r


def data_defaults() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # One RLDS dataset directory, or several (a mixture) with `weights`. Needed by
  # training and the input pipeline, not by the data tools (None until then).
  d.dir = ml_collections.FieldReference(None, field_type=object)
  d.weights = ml_collections.FieldReference(None, field_type=object)
  d.split = "train"
  d.window = 1                  # observation history length (frames)
  d.image_size = ml_collections.FieldReference(None, field_type=object)  # (h, w); None = stored size
  # "auto": sparse 0/1 rewards pass through, others are rescaled from dataset
  # statistics to [0, 1 - gamma] so that Q stays in [0, 1] (QSFT.md).
  d.reward_rescale = "auto"     # "auto" | "none" | "minmax"
  d.shuffle_buffer = 10_000
  d.num_parallel_calls = -1     # -1 = tf.data.AUTOTUNE
  d.prefetch = 2
  d.deterministic = False       # fixed order and single-threaded maps (tests, resumption)
  d.augment = ml_collections.ConfigDict()
  d.augment.enabled = False
  d.augment.crop_scale = 0.9    # random crop keeps this fraction of each side
  d.augment.brightness = 0.1
  d.augment.contrast = 0.1
  # "rlds": batches from data.dir through tf.data. "reverb": examples sampled from a
  # replay server's table (qsft_vla/replay), mixed with data.dir's examples when
  # reverb.weight < 1; data.dir is still read for its statistics (action bounds,
  # reward scale), which must be those the table was filled with.
  d.source = "rlds"
  d.reverb = ml_collections.ConfigDict()
  d.reverb.server = ""           # HOST:PORT
  d.reverb.weight = 1.0          # share of each batch sampled from the table
  d.reverb.timeout_s = 300.0     # a sample waiting longer is an error naming server and table
  return d


def model_defaults() -> ml_collections.ConfigDict:
  """The backbone: `name` picks one, and the section of that name holds its
  sizes (models/registry.py maps names to modules). The other sections are
  ignored, so switching backbones is one flag: --config.model.name=vlm."""
  m = ml_collections.ConfigDict()
  m.name = "rt1_small"          # "rt1_small" | "vlm"
  m.rt1_small = rt1_small_defaults()
  m.vlm = vlm_defaults()
  return m


def dataclass_section(cls) -> ml_collections.ConfigDict:
  """A config section with the fields and defaults of `cls`, a config dataclass
  (its one schema), except those in cls.NOT_CONFIGURABLE. An Optional field
  defaulting to None is typed by its inner type, so the command line parses it
  (--config.model.vlm.lm_layers=2); one with a value also accepts None."""
  hints = typing.get_type_hints(cls)
  section = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    if f.name in getattr(cls, "NOT_CONFIGURABLE", ()):
      continue
    if f.default is dataclasses.MISSING:
      raise TypeError(f"{cls.__name__}.{f.name} has no default: set it in NOT_CONFIGURABLE "
                      "or give it one")
    args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
    optional = typing.get_origin(hints[f.name]) is typing.Union and len(args) == 1
    if optional:
      kind = args[0] if f.default is None else object
      section[f.name] = ml_collections.FieldReference(f.default, field_type=kind)
    else:
      section[f.name] = f.default
  return section


def rt1_small_defaults() -> ml_collections.ConfigDict:
  """models.rt1_small.RT1SmallConfig: a small RT-1 style network (from scratch,
  or RT-1's pretrained encoders with the variant rt1_pretrained)."""
  from qsft_vla.models import rt1_small  # pylint: disable=g-import-not-at-top
  return dataclass_section(rt1_small.RT1SmallConfig)


def vlm_defaults() -> ml_collections.ConfigDict:
  """models.vlm.VLMConfig: EfficientNet-Lite0 -> projector -> prefix of a
  pretrained Llama (SmolLM2-135M) whose own vocabulary holds the action bins."""
  from qsft_vla.models import vlm  # pylint: disable=g-import-not-at-top
  return dataclass_section(vlm.VLMConfig)


def learner_defaults() -> ml_collections.ConfigDict:
  """learning.spec.LearnerConfig (QSFT.md; defaults: the paper's Table 4)."""
  return dataclass_section(learner_spec.LearnerConfig)


def train_defaults() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.num_steps = 10_000          # optimiser steps
  t.batch_size = 128            # global batch, split over the devices of the mesh
  t.checkpoint_every = 1_000    # also at the end
  t.keep_checkpoints = 3        # the last k are kept
  t.log_every = 50              # metrics.jsonl, TensorBoard, progress line
  t.validate_data = True        # full pass over the non-image data before training
  # Steps with a non-finite loss or gradient are skipped (nothing changes); more
  # than this many stop training with an error. 0: stop at the first.
  t.max_nonfinite_steps = 0
  # Devices: the mesh is (data, fsdp) over all of them. fsdp > 1 splits params,
  # target and optimiser states over fsdp devices (FSDP), placed by "REGEX:AXIS"
  # rules on the leaves' names (learning/sharding.py); the math does not change.
  t.fsdp = 1
  t.sharding_rules = sharding.DEFAULT_RULES
  return t


def eval_defaults() -> ml_collections.ConfigDict:
  """Closed-loop evaluation in simulation (qsft_vla.evaluate, and during training)."""
  e = ml_collections.ConfigDict()
  e.env = ""                    # e.g. "babyai:BabyAI-GoToLocal-v0"; "" = no simulator
  e.every = 0                   # during training: every N steps (0 = never)
  e.episodes = 20
  e.seed = 1000                 # episode i is reset with evaluation.eval_reset_seed(seed, i)
  e.max_steps = ml_collections.FieldReference(None, field_type=object)  # None: the env's limit
  e.video_episodes = 3
  # The Q-gap diagnostic (training/q_gap.py) on this split of the first dataset,
  # at every checkpoint: "" = off; e.g. "train[95%:]" with data.split="train[:95%]".
  e.q_gap_split = ""
  e.q_gap_examples = 2048
  return e


def replay_defaults() -> ml_collections.ConfigDict:
  """The Reverb replay table (qsft_vla/replay): one item per training example,
  in the layout of data.examples.example_spec."""
  r = ml_collections.ConfigDict()
  r.table = "examples"
  r.max_size = 1_000_000        # items; the oldest go first (FIFO remover)
  r.sampler = "uniform"         # "uniform" | "prioritized"
  r.priority_exponent = 0.8     # prioritized only
  # "min_size": sampling waits until min_size_to_sample items are in.
  # "sample_to_insert": also keeps samples per insert near samples_per_insert
  # (within error_buffer), so learners neither outrun nor starve the actors.
  r.rate_limiter = "min_size"
  r.min_size_to_sample = 1
  r.samples_per_insert = 32.0
  r.error_buffer = 1_000.0
  return r


def base_config() -> ml_collections.ConfigDict:
  """The full schema, locked. Robot config files fill in the REQUIRED fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.robot = robot_defaults()
  c.data = data_defaults()
  c.model = model_defaults()
  c.learner = learner_defaults()
  c.train = train_defaults()
  c.eval = eval_defaults()
  c.replay = replay_defaults()
  c.lock()
  return c


ALGORITHM_VARIANTS = learner_spec.ALGORITHMS


def apply_algorithm_variant(c: ml_collections.ConfigDict, variant: str, where: str) -> None:
  """Sets the learner for a config-file variant: Q-SFT or one of its baselines.

  The baselines run the same learner with pi_phi alone; their controller acts
  greedily with pi_phi (the "p" extraction at beta 0), whatever the learner's
  extraction and betas say: "sample" at beta 0 would rank candidates by log pi,
  a search over pi_phi's actions rather than the imitation baseline.
  """
  if variant not in ALGORITHM_VARIANTS:
    raise ConfigError(f"{where}: unknown variant {variant!r}; known: "
                      f"{', '.join(ALGORITHM_VARIANTS)}")
  c.learner.algorithm = variant
  if variant != "qsft":
    c.learner.beta = 0.0
    c.learner.ratio_beta = 0.0
    c.learner.extraction = "p"


def measured_learner(c: ml_collections.ConfigDict) -> None:
  """The learning choices the policy-quality measurements support, which the
  robot configs take instead of the paper's (benchmarks/results/
  policy_quality_exploration.md and policy_quality_medium.md). The paper's
  in-support max backup pinned every Bellman weight at the clip (the max of noisy
  ratios of two networks exceeds 1/gamma), so p_theta = pi_phi and Q-SFT was BC;
  the Monte-Carlo target did as well as every bootstrapped variant tried, and
  needs no target network or next-state passes. Separate networks beat the shared
  trunk (gotolocal, one seed: 83% vs 66% at beta 64): p_theta learns better
  without the BC loss steering its features. The bootstrapped setting measured
  beside it is learner.mc_mix=0.5 (the behaviour-value backup with the
  Monte-Carlo bound and the faster target set here).

  The controller's extraction is "sample" at beta 32 (ratio_beta): of every
  (extraction, beta) on the suite's validation stream it has the best mean over
  the tasks (72%; the paper's "p" at beta 64 fell to 39% on reach, whose p_theta
  spreads its mass over 256 bins x 4 dimensions), and on each task it is within
  9 points of that task's own best (results/policy_quality_exploration.md, "One
  extraction for every task"). beta stays 64 for learner.extraction=p."""
  c.learner.architecture = "separate"
  c.learner.mc_mix = 1.0
  c.learner.backup = "mean"
  c.learner.mc_lower_bound = True
  c.learner.polyak_alpha = 0.05
  c.learner.beta = 64.0
  c.learner.extraction = "sample"
  c.learner.ratio_beta = 32.0


def _rt1_pretrained(c: ml_collections.ConfigDict) -> None:
  """RT-1 style: pretrained FiLM-EfficientNet-Lite0 conditioned on the MiniLM
  instruction embedding, TokenLearner to 8 tokens per frame; the robot's
  transformer sizes and image size are kept (56x56 / 64x64 give a 2x2x1280
  feature map). Fine-tuning pretrained weights: lr at most 3e-4 (untuned)."""
  c.model.name = "rt1_small"
  c.model.rt1_small.image_encoder = "efficientnet_lite0"
  c.model.rt1_small.text_encoder = "minilm"
  c.model.rt1_small.tokens_per_image = 8
  c.learner.lr_pi = min(c.learner.lr_pi, 3e-4)
  c.learner.lr_p = min(c.learner.lr_p, 3e-4)


def _vlm_smollm2(c: ml_collections.ConfigDict) -> None:
  """LLaVA style: SmolLM2-135M with the action bins as its last 256 vocabulary
  ids; pi_phi and p_theta are the LM's own next-token distributions. The
  robot's image size is kept. Fine-tuning a pretrained LM: lr at most 1e-4
  (the paper's Table 4 value; untuned here)."""
  c.model.name = "vlm"
  c.learner.lr_pi = min(c.learner.lr_pi, 1e-4)
  c.learner.lr_p = min(c.learner.lr_p, 1e-4)


BACKBONE_VARIANTS = {"rt1_pretrained": _rt1_pretrained, "vlm_smollm2": _vlm_smollm2}


def _lora(c: ml_collections.ConfigDict) -> None:
  """LoRA on the backbone's pretrained weights (models/lora.py): rank-8 adapters
  (alpha 16, PEFT's common choice; untuned here) on every linear map of the
  pretrained transformers and EfficientNet's 1x1 convolutions (the default
  learner.lora_targets); new layers are trained in full. Needs a backbone with
  pretrained weights (rt1_pretrained, vlm_smollm2). The three networks are three
  adapter sets on one frozen base, so the architecture is "separate" whatever the
  robot config picked."""
  c.learner.lora_rank = 8
  c.learner.lora_alpha = 16.0
  c.learner.architecture = "separate"


def _shared_encoder(c: ml_collections.ConfigDict) -> None:
  """Q-SFT's cheaper architecture (learner.architecture="shared_encoder"): one
  observation encoder, trained by both losses, under pi_phi's and p_theta's own
  transformers, so a step runs the image convolutions once, not twice
  (benchmarks/results/train_step_time.md). rt1_small only."""
  c.learner.architecture = "shared_encoder"


def _pi_head(c: ml_collections.ConfigDict) -> None:
  """Q-SFT at about the price of BC (learner.architecture="pi_head"): p_theta's
  network alone, with pi_phi a second output head on its features behind a
  stop-gradient, so a step trains one network (benchmarks/results/train_step_time.md)."""
  c.learner.architecture = "pi_head"


def _separate(c: ml_collections.ConfigDict) -> None:
  """pi_phi and p_theta as two networks (learner.architecture="separate"), the
  paper's setting, where the robot config picked another architecture."""
  c.learner.architecture = "separate"


def _chunks(c: ml_collections.ConfigDict) -> None:
  """Batches of runs of 8 consecutive steps (learner.chunk_length): the bootstrapped
  targets' next-state passes reuse the current-state ones (learning/learner.py,
  "Chunked batches"; benchmarks/results/train_step_time_chunks*.md). A batch then
  holds batch_size / 8 runs, fewer independent samples; the pure Monte-Carlo target
  (the robot configs' measured choice) has no next-state pass to save."""
  c.learner.chunk_length = 8


# Variants that modify whatever algorithm and backbone they join.
MODIFIER_VARIANTS = {"lora": _lora, "shared_encoder": _shared_encoder, "pi_head": _pi_head,
                     "separate": _separate, "chunks": _chunks}


def apply_variant(c: ml_collections.ConfigDict, variant: str, where: str) -> None:
  """A config-file variant: "<algorithm>", "<backbone>", a modifier ("lora"), or
  several joined by "+" (e.g. "bc+rt1_pretrained", "vlm_smollm2+lora"); the
  algorithm defaults to qsft, the backbone to the robot's own model section.
  The backbone applies first, then the modifiers, then the algorithm."""
  algorithms, backbones, modifiers = [], [], []
  for part in variant.split("+"):
    if part in ALGORITHM_VARIANTS:
      algorithms.append(part)
    elif part in BACKBONE_VARIANTS:
      backbones.append(part)
    elif part in MODIFIER_VARIANTS and part not in modifiers:
      modifiers.append(part)
    else:
      inside = f" (in {variant!r})" if part != variant else ""
      raise ConfigError(f"{where}: unknown or repeated variant {part!r}{inside}; known: "
                        f"algorithms {', '.join(ALGORITHM_VARIANTS)}; backbones "
                        f"{', '.join(BACKBONE_VARIANTS)}; modifiers "
                        f"{', '.join(MODIFIER_VARIANTS)}")
  if len(algorithms) > 1 or len(backbones) > 1:
    raise ConfigError(f"{where}: variant {variant!r} names more than one algorithm or backbone")
  for b in backbones:
    BACKBONE_VARIANTS[b](c)
  for m in modifiers:
    MODIFIER_VARIANTS[m](c)
  apply_algorithm_variant(c, algorithms[0] if algorithms else "qsft", where)


# --------------------------------------------------------------------------- #
# Loading and validation.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:variant]` and validates it."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path!r}")
  module_spec = importlib.util.spec_from_file_location(
      "_qsft_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (a config file is user code)
    raise ConfigError(f"{path}: cannot load the config file: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: no get_config() function")
  cfg = module.get_config(variant) if variant else module.get_config()
  validate(cfg, where=spec)
  return cfg


def _walk(cfg, prefix=""):
  for key in cfg.keys():
    value = cfg[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, name + ".")
    else:
      yield name, value


def validate(cfg: ml_collections.ConfigDict, where: str = "config") -> None:
  """Fails with the field named when a required field is unset or a value is invalid."""
  missing = [n for n, v in _walk(cfg) if isinstance(v, str) and v == REQUIRED]
  if missing:
    raise ConfigError(f"{where}: required field(s) not set: {', '.join(missing)}")
  if "robot" in cfg:
    # Builds the spec, which checks every robot field.
    robot.RobotSpec.from_config(cfg.robot, where=where)
  if "data" in cfg:
    _validate_data(cfg.data, where)
  if "train" in cfg:
    _validate_train(cfg.train, where)
  if "eval" in cfg:
    _validate_eval(cfg.eval, where)
  if "replay" in cfg:
    _validate_replay(cfg.replay, where)
  if "learner" in cfg:
    # The learner's schema checks its own fields (learning.spec.LearnerConfig).
    try:
      learner_spec.LearnerConfig.from_dict(cfg.learner.to_dict())
    except ValueError as e:
      raise ConfigError(f"{where}: learner: {e}") from None


def _validate_train(t, where):
  for name in ("num_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
               "max_nonfinite_steps", "fsdp"):
    v = t[name]
    low = 0 if name in ("num_steps", "max_nonfinite_steps") else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ConfigError(f"{where}: train.{name} must be an integer >= {low}, got {v!r}")
  if isinstance(t.sharding_rules, str):
    raise ConfigError(f"{where}: train.sharding_rules must be a list of 'REGEX:AXIS' strings, "
                      f"got the string {t.sharding_rules!r}")
  try:
    sharding.parse_rules(t.sharding_rules)
  except ValueError as e:
    raise ConfigError(f"{where}: train.{e}") from None


REPLAY_SAMPLERS = ("uniform", "prioritized")
RATE_LIMITERS = ("min_size", "sample_to_insert")


def _validate_replay(r, where):
  if not isinstance(r.table, str) or not r.table.strip():
    raise ConfigError(f"{where}: replay.table must be a non-empty name, got {r.table!r}")
  for name, allowed in (("sampler", REPLAY_SAMPLERS), ("rate_limiter", RATE_LIMITERS)):
    if r[name] not in allowed:
      raise ConfigError(f"{where}: replay.{name} must be one of {allowed}, got {r[name]!r}")
  for name in ("max_size", "min_size_to_sample"):
    if isinstance(r[name], bool) or not isinstance(r[name], int) or r[name] < 1:
      raise ConfigError(f"{where}: replay.{name} must be an integer >= 1, got {r[name]!r}")
  if r.min_size_to_sample > r.max_size:
    raise ConfigError(f"{where}: replay.min_size_to_sample={r.min_size_to_sample} exceeds "
                      f"replay.max_size={r.max_size}: sampling could never start")
  for name in ("priority_exponent", "samples_per_insert", "error_buffer"):
    v = r[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and v < float("inf")):
      raise ConfigError(f"{where}: replay.{name} must be a finite number >= 0, got {v!r}")
  if r.rate_limiter == "sample_to_insert" and r.samples_per_insert <= 0:
    raise ConfigError(f"{where}: replay.samples_per_insert must be > 0 with the "
                      "sample_to_insert rate limiter")
  if r.rate_limiter == "sample_to_insert" and r.error_buffer < max(1.0, r.samples_per_insert):
    # A narrower window can block inserts and samples at once: each waits for the
    # other, a deadlock, certain for one process that inserts and samples in turn.
    raise ConfigError(f"{where}: replay.error_buffer={r.error_buffer:g} must be at least "
                      f"max(1, replay.samples_per_insert)={max(1.0, r.samples_per_insert):g}: "
                      "a narrower window lets the rate limiter block inserts and samples at "
                      "once (a deadlock)")


def _validate_eval(e, where):
  if e.env:
    from qsft_vla import envs  # pylint: disable=g-import-not-at-top
    try:
      envs.parse_env_id(e.env)  # the prefix only: the simulator is imported when used
    except ValueError as err:
      raise ConfigError(f"{where}: eval.env: {err}") from None
  for name in ("every", "episodes", "seed", "video_episodes"):
    if isinstance(e[name], bool) or not isinstance(e[name], int) or e[name] < 0:
      raise ConfigError(f"{where}: eval.{name} must be an integer >= 0, got {e[name]!r}")
  if e.every and not e.env:
    raise ConfigError(f"{where}: eval.every={e.every} needs eval.env (a simulator id)")
  if e.max_steps is not None and (not isinstance(e.max_steps, int) or e.max_steps < 1):
    raise ConfigError(f"{where}: eval.max_steps must be None or an integer >= 1, "
                      f"got {e.max_steps!r}")


def data_sources(data, where: str = "config") -> tuple[tuple[str, ...], tuple[float, ...]]:
  """(dirs, weights) of a `data` section: data.dir is one dataset directory or a
  list (a mixture), data.weights None (1 each) or one per dir, >= 0 with a
  positive sum (a mixture samples dir i with weight_i / sum)."""
  d = data.dir
  if d is None:
    raise ConfigError(f"{where}: data.dir is not set: an RLDS dataset directory (or a list)")
  dirs = tuple(d) if isinstance(d, (list, tuple)) else (d,)
  if not dirs or not all(isinstance(x, str) and x for x in dirs):
    raise ConfigError(f"{where}: data.dir must be a directory or a list of them, got {d!r}")
  weights = [1.0] * len(dirs) if data.weights is None else [float(w) for w in data.weights]
  if len(weights) != len(dirs):
    raise ConfigError(f"{where}: data.weights has {len(weights)} entries for "
                      f"{len(dirs)} data.dir entries")
  if any(not w >= 0 for w in weights) or sum(weights) <= 0:
    raise ConfigError(f"{where}: data.weights must be >= 0 with a positive sum, "
                      f"got {data.weights}")
  return dirs, tuple(weights)


def _validate_data(d, where):
  if d.dir is not None:
    data_sources(d, where)
  if d.window < 1:
    raise ConfigError(f"{where}: data.window must be >= 1, got {d.window}")
  if d.reward_rescale not in ("auto", "none", "minmax"):
    raise ConfigError(f"{where}: data.reward_rescale must be auto|none|minmax, "
                      f"got {d.reward_rescale!r}")
  if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
    raise ConfigError(f"{where}: data.image_size must be (height, width), got {d.image_size!r}")
  if d.source not in ("rlds", "reverb"):
    raise ConfigError(f"{where}: data.source must be rlds|reverb, got {d.source!r}")
  if d.source == "reverb":
    if not isinstance(d.reverb.server, str) or ":" not in d.reverb.server:
      raise ConfigError(f"{where}: data.source=reverb needs data.reverb.server=HOST:PORT, "
                        f"got {d.reverb.server!r}")
    if not 0.0 < d.reverb.weight <= 1.0:
      raise ConfigError(f"{where}: data.reverb.weight must be in (0, 1], got {d.reverb.weight}")
    if not d.reverb.timeout_s > 0:
      raise ConfigError(f"{where}: data.reverb.timeout_s must be > 0, got {d.reverb.timeout_s}")


def as_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain-JSON form (stored with datasets and checkpoints)."""
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(cfg.to_json())


def check_config_args(argv) -> Optional[str]:
  """The message for a `--config=` file that does not load (missing, not Python, an
  unknown variant, an invalid value) or the first `--config.a.b=...` that names no
  field of it, else None. ml_collections meets both while absl parses the flags
  and raises a raw traceback there, before main() can say anything."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    return None
  try:
    cfg = load_config_file(path)
  except ConfigError as e:
    return f"--config={path}: {e}"
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    node = cfg
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:i]) or "the config"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f"{arg}: {'.'.join(parts[:i + 1])} is not a field of {path} "
                f"({where} has: {', '.join(known) or 'no sub-fields'})")
      node = node[part]
  return None


def exit_on_bad_config_args(prog: str, argv) -> None:
  """Before absl parses the flags of a binary with a --config flag: one line naming
  what is wrong (check_config_args) and exit status 2, instead of a traceback."""
  refused = check_config_args(argv)
  if refused:
    import sys  # pylint: disable=g-import-not-at-top
    print(f"{prog}: error: {refused}", file=sys.stderr)
    sys.exit(2)
