"""Backbones by name: the config's `model` section -> a flax module, and back from a checkpoint.

A checkpoint stores {"name": ..., "config": <the model's full config dict>}, so
the controller rebuilds the exact network without the robot config or dataset.
"""

from __future__ import annotations

from typing import Any, Mapping

from qsft_vla.config import ConfigError
from qsft_vla.models import rt1_small

# name -> (module class, config class)
_MODELS = {"rt1_small": (rt1_small.RT1Small, rt1_small.RT1SmallConfig)}

# Config-file fields that are not model sizes (the rest of cfg.model is passed as is).
_NOT_SIZES = ("name",)


def known() -> tuple[str, ...]:
  return tuple(_MODELS)


def _classes(name: str):
  if name not in _MODELS:
    raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(_MODELS)}")
  return _MODELS[name]


def model_config(cfg, spec, action_tokenizer, num_output_heads: int = 1,
                 text_vocab: int | None = None):
  """The model config for a run: robot and tokenizers fix the inputs/outputs,
  cfg.model the sizes, the learner the number of output heads."""
  _, config_cls = _classes(cfg.model.name)
  sizes = {k: v for k, v in cfg.model.items() if k not in _NOT_SIZES}
  if text_vocab is not None:
    sizes["text_vocab"] = int(text_vocab)
  for k in ("conv_channels",):
    if k in sizes:
      sizes[k] = tuple(sizes[k])
  try:
    return config_cls.for_robot(spec, action_tokenizer, window=cfg.data.window,
                                num_output_heads=num_output_heads, **sizes)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model ({cfg.model.name}): {e}") from None


def build(name: str, model_cfg):
  """The flax module for `name` with a config object of that model."""
  module_cls, _ = _classes(name)
  return module_cls(model_cfg)


def describe(name: str, model_cfg) -> dict[str, Any]:
  """JSON form stored in checkpoints."""
  return {"name": name, "config": model_cfg.to_dict()}


def from_description(d: Mapping[str, Any]):
  """(module, model config) from `describe`'s output."""
  name = d.get("name")
  _, config_cls = _classes(name)
  model_cfg = config_cls.from_dict(d["config"])
  return build(name, model_cfg), model_cfg


def uses_pretrained(name: str, model_cfg) -> bool:
  """Whether `pretrained_variables` changes anything for this model."""
  _classes(name)
  return (getattr(model_cfg, "image_encoder", "conv") != "conv"
          or getattr(model_cfg, "text_encoder", "learned") != "learned")


def pretrained_variables(name: str, model_cfg, variables):
  """`variables` (a fresh init) with the image/text encoder params replaced by
  the packaged pretrained weights: EfficientNet-Lite0 (ImageNet, batch norms
  folded) for image_encoder "efficientnet_lite0", all-MiniLM-L6-v2 for
  text_encoder "minilm". FiLM, TokenLearner and the transformer keep their
  init (FiLM is the identity there, so the pretrained features pass through).
  Shapes are checked, so a mismatch fails here and not in the first step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not uses_pretrained(name, model_cfg):
    return variables
  params = dict(variables["params"])

  def overwrite(scope, loaded):
    fresh = params[scope]
    merged = dict(fresh)
    for k, v in loaded.items():
      if k not in fresh:
        raise ValueError(f"pretrained {scope}: no {k!r} in the model")
      want = jax.tree_util.tree_structure(fresh[k])
      if jax.tree_util.tree_structure(v) != want:
        raise ValueError(f"pretrained {scope}/{k}: structure differs from the model")
      for a, b in zip(jax.tree_util.tree_leaves(fresh[k]), jax.tree_util.tree_leaves(v)):
        if np.shape(a) != np.shape(b):
          raise ValueError(f"pretrained {scope}/{k}: shape {np.shape(b)} != {np.shape(a)}")
      merged[k] = jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.asarray(y).dtype), v,
                                         fresh[k])
    params[scope] = merged

  if model_cfg.image_encoder == "efficientnet_lite0":
    from qsft_vla.models import film_efficientnet  # pylint: disable=g-import-not-at-top
    overwrite("image_encoder", film_efficientnet.pretrained_params())
  if model_cfg.text_encoder == "minilm":
    from qsft_vla.models import minilm  # pylint: disable=g-import-not-at-top
    _, loaded, _ = minilm.load_minilm()
    overwrite("text_encoder", loaded["params"])
  return {**variables, "params": params}


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
