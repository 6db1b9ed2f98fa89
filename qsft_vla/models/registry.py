"""Backbones by name: the config's `model` section -> a flax module, and back from a checkpoint.

`cfg.model.name` picks a backbone and `cfg.model.<name>` holds its sizes.
Each backbone brings its own instruction tokenizer (the one its pretrained
text weights were trained with) and its own initialisation (random, or the
packaged pretrained weights). A checkpoint stores {"name": ..., "config":
<the model's full config dict>}, so the controller rebuilds the exact network
without the robot config or dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from qsft_vla.errors import ConfigError
from qsft_vla.learning import spec as learner_spec
from qsft_vla.models import rt1_small, vlm
from qsft_vla.tokenizers.text import TextTokenizer


@dataclasses.dataclass(frozen=True)
class _Backbone:
  module: type
  config: type
  # The config section -> the instruction tokenizer.
  text_tokenizer: Callable[[Mapping[str, Any]], TextTokenizer]
  # (module, rng, *example_inputs, pretrained=bool) -> variables.
  init_variables: Callable[..., Any]
  # model config -> the params subtrees loaded from pretrained weights (numpy).
  pretrained_params: Callable[[Any], Mapping[str, Any]]
  # model config -> where those weights come from (package and version, or folder).
  pretrained_sources: Callable[[Any], list]


_MODELS = {
    # MiniLM's WordPiece: its sentence encoder needs it, and the learned
    # embeddings of the from-scratch model are as good on it as on any.
    "rt1_small": _Backbone(rt1_small.RT1Small, rt1_small.RT1SmallConfig,
                           lambda section: TextTokenizer.from_package(),
                           rt1_small.init_variables, rt1_small.pretrained_params,
                           rt1_small.pretrained_sources),
    "vlm": _Backbone(vlm.VLM, vlm.VLMConfig,
                     lambda section: TextTokenizer.from_file(
                         vlm.tokenizer_path(section.get("lm_folder"))),
                     vlm.init_variables, vlm.pretrained_params,
                     vlm.pretrained_sources),
}


def known() -> tuple[str, ...]:
  return tuple(_MODELS)


def _entry(name: str) -> _Backbone:
  if name not in _MODELS:
    raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(_MODELS)}")
  return _MODELS[name]


def _section(cfg) -> dict[str, Any]:
  """The sizes of the chosen backbone: cfg.model.<name> as a plain dict."""
  name = cfg.model.name
  _entry(name)
  if name not in cfg.model:
    raise ConfigError(f"model.{name}: the config has no section for model {name!r}")
  section = cfg.model[name]
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def text_tokenizer(cfg) -> TextTokenizer:
  """The instruction tokenizer of the config's backbone."""
  try:
    return _entry(cfg.model.name).text_tokenizer(_section(cfg))
  except (OSError, ValueError) as e:
    raise ConfigError(f"model.{cfg.model.name}: instruction tokenizer: {e}") from None


def model_config(cfg, spec, action_tokenizer, learner=None, text_vocab: int | None = None):
  """The model config for a run: robot and tokenizers fix the inputs/outputs,
  cfg.model.<name> the sizes, the learner (a LearnerConfig; None: BC's single
  head) its output heads (LearnerConfig.model_fields)."""
  config_cls = _entry(cfg.model.name).config
  learner_fields = {}
  if learner is not None:
    try:
      learner_spec.check_model_fields(config_cls, learner)
    except ValueError as e:
      raise ConfigError(f"model.{cfg.model.name}: {e}") from None
    learner_fields = learner.model_fields
  sizes = _section(cfg)
  for k, v in sizes.items():
    if isinstance(v, list):
      sizes[k] = tuple(v)
  if text_vocab is not None:
    sizes["text_vocab"] = int(text_vocab)
  try:
    return config_cls.for_robot(spec, action_tokenizer, window=cfg.data.window,
                                **learner_fields, **sizes)
  except (TypeError, ValueError, OSError) as e:
    raise ConfigError(f"model.{cfg.model.name}: {e}") from None


def build(name: str, model_cfg):
  """The flax module for `name` with a config object of that model."""
  return _entry(name).module(model_cfg)


def describe(name: str, model_cfg) -> dict[str, Any]:
  """JSON form stored in checkpoints."""
  return {"name": name, "config": model_cfg.to_dict()}


def from_description(d: Mapping[str, Any]):
  """(module, model config) from `describe`'s output."""
  name = d.get("name")
  model_cfg = _entry(name).config.from_dict(d["config"])
  return build(name, model_cfg), model_cfg


def uses_pretrained(name: str, model_cfg) -> bool:
  """Whether `init_variables` loads pretrained weights for this model config."""
  _entry(name)
  return bool(model_cfg.uses_pretrained)


def init_variables(name: str, model, rng, example_inputs, pretrained: bool = True):
  """The model's initial variables: a random init with the packaged pretrained
  weights loaded on top where the config uses them (pretrained=False: random
  only, e.g. to time the architecture where the weights are not installed)."""
  return _entry(name).init_variables(model, rng, *example_inputs, pretrained=pretrained)


def pretrained_params(name: str, model_cfg) -> dict[str, Any]:
  """{"params": the subtrees of the model's params that come from pretrained
  weights} (the frozen base of a LoRA run); {"params": {}} when there are none."""
  return {"params": dict(_entry(name).pretrained_params(model_cfg))}


def pretrained_sources(name: str, model_cfg) -> list[str]:
  """Where pretrained_params's weights come from: package and version, or a folder."""
  return list(_entry(name).pretrained_sources(model_cfg))


def example_inputs(model_cfg, image_sizes: Mapping[str, tuple[int, int]], batch: int = 1):
  """Zero inputs of the right shapes and dtypes (for init and shape inference):
  (observation, history_mask, text_ids, text_mask, action_tokens)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  w = model_cfg.window
  obs = {cam: np.zeros((batch, w, *image_sizes[cam], 3), np.uint8) for cam in model_cfg.cameras}
  if model_cfg.state_dim:
    obs["state"] = np.zeros((batch, w, model_cfg.state_dim), np.float32)
  return (obs, np.ones((batch, w), bool), np.zeros((batch, model_cfg.max_text_len), np.int32),
          np.ones((batch, model_cfg.max_text_len), bool),
          np.zeros((batch, model_cfg.num_action_dims), np.int32))
