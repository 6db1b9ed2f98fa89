"""The config schema: every field a config file may set, with its default.

A config file (robot_configs/<robot>.py) starts from `base_config()`, which is
locked: assigning a field the schema does not have fails with the field named.
Fields a robot must set are `REQUIRED` and `validate()` names any left unset.
Keeping the whole schema here means one place to read what can be configured.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections

# Placeholder for fields a config file must set; a string so ConfigDict types it.
REQUIRED = "<required>"

ACTION_KINDS = ("continuous", "discrete")


class ConfigError(ValueError):
  """A config file or field is wrong; the message names the field."""


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


def base_config() -> ml_collections.ConfigDict:
  """The full schema, locked. Robot config files fill in the REQUIRED fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.robot = robot_defaults()
  c.data = data_defaults()
  c.learner = ml_collections.ConfigDict()
  c.learner.gamma = 0.99
  c.lock()
  return c


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
    from qsft_vla import robot  # pylint: disable=g-import-not-at-top
    robot.RobotSpec.from_config(cfg.robot, where=where)
  if "data" in cfg:
    _validate_data(cfg.data, where)


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


def check_dataclass_fields(cls, d: Mapping[str, Any]) -> None:
  """Fails with the unknown field(s) named when `d` has keys `cls` (a dataclass) lacks."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")


def as_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain-JSON form (stored with datasets and checkpoints)."""
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(cfg.to_json())
