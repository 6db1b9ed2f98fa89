"""The config schema: every field a config file may set, with its default.

A config file (robot_configs/<robot>.py) starts from `base_config()`, which is
locked: assigning a field the schema does not have fails with the field named.
Fields a robot must set are `REQUIRED` and `validate()` names any left unset.
Keeping the whole schema here means one place to read what can be configured.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from qsft_vla import robot
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


def rt1_small_defaults() -> ml_collections.ConfigDict:
  """models.rt1_small.RT1SmallConfig: a small RT-1 style network (from scratch,
  or RT-1's pretrained encoders with the variant rt1_pretrained)."""
  m = ml_collections.ConfigDict()
  m.max_text_len = 16           # instruction tokens (MiniLM WordPiece), padded/truncated
  m.text_dim = 64
  m.conv_channels = (32, 64, 128)
  m.tokens_per_image = 8
  m.width = 128
  m.depth = 3
  m.num_heads = 4
  m.mlp_ratio = 4
  m.dropout = 0.0
  m.image_encoder = "conv"      # "conv" | "efficientnet_lite0" (pretrained, FiLM; RT-1)
  m.text_encoder = "learned"    # "learned" | "minilm" (pretrained sentence embedding)
  m.train_text_encoder = False  # minilm: fine-tune it (default frozen, as RT-1's USE)
  return m


def vlm_defaults() -> ml_collections.ConfigDict:
  """models.vlm.VLMConfig: EfficientNet-Lite0 -> projector -> prefix of a
  pretrained Llama (SmolLM2-135M) whose own vocabulary holds the action bins."""
  m = ml_collections.ConfigDict()
  m.max_text_len = 16           # instruction tokens (the LM's own tokenizer)
  # A Hugging Face Llama folder (config.json, safetensors, tokenizer.json);
  # None: the packaged SmolLM2-135M-Instruct, converted from GGUF on first use.
  m.lm_folder = ml_collections.FieldReference(None, field_type=str)
  # The first N decoder layers only (None: all); a cheaper, weaker model.
  m.lm_layers = ml_collections.FieldReference(None, field_type=int)
  m.image_tokens_per_frame = 4  # per camera: EfficientNet features pooled to this many
  m.projector_hidden = 1024
  m.freeze_vision = False
  m.dropout = 0.0               # on the projected image/state tokens
  m.compute_dtype = "float32"   # "bfloat16" on accelerators; params stay float32
  # Vocabulary ids (models/vlm.py says why): None = the last 256 ids.
  m.action_id_offset = ml_collections.FieldReference(None, field_type=int)
  m.dummy_vocab_id = 16         # SmolLM2 "<empty_output>"
  m.start_vocab_id = 1          # SmolLM2 "<|im_start|>"
  return m


def learner_defaults() -> ml_collections.ConfigDict:
  """learning.LearnerConfig fields (QSFT.md; defaults: the paper's Table 4)."""
  l = ml_collections.ConfigDict()
  l.algorithm = "qsft"          # "qsft" | "bc" | "filtered_bc" (the config variants)
  l.beta = 1.0                  # inference: pi * exp(beta * p); 0 = behaviour cloning
  # Inference: "p" (the paper's pi * exp(beta * p)) or "ratio" (pi * exp(ratio_beta * p / pi)
  # over the support pi > ratio_eps: ranks actions by the implied Q = p / pi).
  l.extraction = "p"
  l.ratio_beta = 1.0
  l.ratio_eps = 0.01
  l.gamma = 0.99
  l.eps = 1e-4                  # support threshold on pi_phi in the Bellman target
  l.clip_weights = True         # clip Bellman weights to [0, 1]
  l.mc_lower_bound = False      # weight = max(Bellman target, observed return-to-go G_t)
  # Mixed Monte-Carlo target: weight = (1 - mc_mix) * Bellman target + mc_mix * G_t;
  # 1 = pure Monte Carlo (no bootstrap: the target network is never evaluated).
  l.mc_mix = 0.0
  # "max": the paper's in-support max of p_bar / pi at the next state; "mean": its
  # expectation under pi, sum_b p_bar(b) (the behaviour's value; no ratio noise).
  l.backup = "max"
  # "independent": p_theta's own logits (the paper); "residual": stop_grad(log pi) + the
  # p network's output, whose head starts at zero (learning/policy.residual_p_logits).
  l.p_parametrization = "independent"
  l.residual = "dummy"          # "dummy" (final paper) | "uniform" (submitted version)
  l.polyak_alpha = 0.005
  l.lr_pi = 1e-4
  l.lr_p = 1e-4
  l.schedule = "joint"          # "joint" | "sequential" (pi_phi first, then p_theta)
  l.pi_steps = 0                # sequential: steps of the pi_phi phase
  l.architecture = "separate"   # "separate" backbones | "shared" trunk with two heads
  l.grad_clip_norm = ml_collections.FieldReference(1.0, field_type=object)  # None: off
  l.steps_per_call = 1          # optimiser steps per jit call (lax.scan)
  # filtered_bc: keep episodes whose return is >= this quantile of the dataset's
  # episode returns (per mixture member, from its statistics).
  l.filter_quantile = 0.5
  l.mask_invalid_logits = True
  return l


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
  c.lock()
  return c


ALGORITHM_VARIANTS = ("qsft", "bc", "filtered_bc")


def apply_algorithm_variant(c: ml_collections.ConfigDict, variant: str, where: str) -> None:
  """Sets the learner for a config-file variant: Q-SFT or one of its baselines.

  The baselines run the same learner with pi_phi alone; their controller uses
  beta = 0 (pure pi_phi), whatever learner.beta says.
  """
  if variant not in ALGORITHM_VARIANTS:
    raise ConfigError(f"{where}: unknown variant {variant!r}; known: "
                      f"{', '.join(ALGORITHM_VARIANTS)}")
  c.learner.algorithm = variant
  if variant != "qsft":
    c.learner.beta = 0.0
    c.learner.ratio_beta = 0.0


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


def apply_variant(c: ml_collections.ConfigDict, variant: str, where: str) -> None:
  """A config-file variant "<algorithm>", "<backbone>" or "<algorithm>+<backbone>"
  (e.g. "bc+rt1_pretrained"); the algorithm defaults to qsft, the backbone to
  the robot's own model section."""
  algorithms, backbones = [], []
  for part in variant.split("+"):
    if part in ALGORITHM_VARIANTS:
      algorithms.append(part)
    elif part in BACKBONE_VARIANTS:
      backbones.append(part)
    else:
      inside = f" (in {variant!r})" if part != variant else ""
      raise ConfigError(f"{where}: unknown variant {part!r}{inside}; known: "
                        f"algorithms {', '.join(ALGORITHM_VARIANTS)}; backbones "
                        f"{', '.join(BACKBONE_VARIANTS)}")
  if len(algorithms) > 1 or len(backbones) > 1:
    raise ConfigError(f"{where}: variant {variant!r} names more than one algorithm or backbone")
  for b in backbones:
    BACKBONE_VARIANTS[b](c)
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
  module_spec.loader.exec_module(module)
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
  if "learner" in cfg and "algorithm" in cfg.learner:
    if cfg.learner.algorithm not in ALGORITHM_VARIANTS:
      raise ConfigError(f"{where}: learner.algorithm must be one of {ALGORITHM_VARIANTS}, "
                        f"got {cfg.learner.algorithm!r}")
    if not 0.0 <= cfg.learner.filter_quantile <= 1.0:
      raise ConfigError(f"{where}: learner.filter_quantile must be in [0, 1], "
                        f"got {cfg.learner.filter_quantile}")


def _validate_train(t, where):
  for name in ("num_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
               "max_nonfinite_steps"):
    v = t[name]
    low = 0 if name in ("num_steps", "max_nonfinite_steps") else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ConfigError(f"{where}: train.{name} must be an integer >= {low}, got {v!r}")


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


def _validate_data(d, where):
  if d.dir is not None:
    dirs = d.dir if isinstance(d.dir, (list, tuple)) else (d.dir,)
    if not dirs or not all(isinstance(x, str) and x for x in dirs):
      raise ConfigError(f"{where}: data.dir must be a directory or a list of them, got {d.dir!r}")
    if d.weights is not None:
      if len(d.weights) != len(dirs):
        raise ConfigError(f"{where}: data.weights has {len(d.weights)} entries for "
                          f"{len(dirs)} data.dir entries")
      if any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
        raise ConfigError(f"{where}: data.weights must be >= 0 with a positive sum, got {d.weights}")
  if d.window < 1:
    raise ConfigError(f"{where}: data.window must be >= 1, got {d.window}")
  if d.reward_rescale not in ("auto", "none", "minmax"):
    raise ConfigError(f"{where}: data.reward_rescale must be auto|none|minmax, "
                      f"got {d.reward_rescale!r}")
  if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
    raise ConfigError(f"{where}: data.image_size must be (height, width), got {d.image_size!r}")


def as_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain-JSON form (stored with datasets and checkpoints)."""
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(cfg.to_json())
