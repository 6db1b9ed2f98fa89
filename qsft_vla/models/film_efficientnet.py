"""RT-1's image tokenizer: FiLM-conditioned EfficientNet-Lite0 + TokenLearner.

RT-1 feeds every camera frame through an ImageNet-pretrained EfficientNet
whose inverted-residual (MBConv) blocks are each followed by a FiLM layer conditioned on the
instruction embedding; the FiLM layers are zero-initialised (identity), so at
init the network computes exactly the pretrained features and fine-tuning
starts where ImageNet left off. TokenLearner then pools the last feature map
into a few tokens per frame.

Batch norm is folded into a per-channel affine (`Affine`: scale, bias in
"params"). The learner differentiates and Polyak-averages whole variable
dicts, so running statistics in a "batch_stats" collection would be trained
as parameters (a variance could go negative); the folded form is the same
function at init (y = x * s / sqrt(var + eps) + b - mean * s / sqrt(var + eps))
and fine-tunes like a frozen-statistics BN with a trainable affine.
`pretrained_params` does the folding from the packaged EfficientNet-Lite0.
Stem and blocks use the same layer names as efficientnet.EfficientNetLite0.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qsft_vla.models import efficientnet as eff
from qsft_vla.models.layers import FiLM, InvertedResidual, TokenLearner


class Affine(nn.Module):
  """x * scale + bias per channel (a folded inference-mode batch norm)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _affine(name: str, dtype) -> Affine:
  return Affine(dtype, name=name)


class FiLMEfficientNetLite0(nn.Module):
  """uint8 images [N, H, W, 3] + condition [N, E] -> tokens [N, num_tokens, width].

  Features are H/32 x W/32 x 1280 (2x2 for 56x56 or 64x64 frames).
  film=False leaves out the FiLM layers (the plain folded EfficientNet-Lite0,
  as the VLM uses it); num_tokens=0 leaves out the TokenLearner (call
  `features`). Parameters stay float32; `dtype` is the compute dtype.
  """
  num_tokens: int = 0
  width: int = 0
  film: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.conv_stem = nn.Conv(eff.STEM_CHANNELS, (3, 3), (2, 2), padding="SAME", use_bias=False,
                             dtype=self.dtype)
    self.bn_stem = Affine(self.dtype)
    specs = eff.block_specs()
    norm = functools.partial(_affine, dtype=self.dtype)
    self.blocks = [InvertedResidual(*spec, norm=norm, dtype=self.dtype, name=f"block_{i}")
                   for i, spec in enumerate(specs)]
    if self.film:
      self.films = [FiLM(self.dtype, name=f"film_{i}") for i in range(len(specs))]
    self.conv_head = nn.Conv(eff.HEAD_CHANNELS, (1, 1), use_bias=False, dtype=self.dtype)
    self.bn_head = Affine(self.dtype)
    if self.num_tokens:
      self.token_learner = TokenLearner(self.num_tokens, self.width, self.dtype)

  def features(self, images, cond=None):
    """The (FiLM-conditioned) EfficientNet feature map [N, H/32, W/32, 1280]."""
    if self.film and cond is None:
      raise ValueError("FiLMEfficientNetLite0 with film=True needs a condition")
    x = eff.normalize(images).astype(self.dtype)
    x = nn.relu6(self.bn_stem(self.conv_stem(x)))
    for i, block in enumerate(self.blocks):
      x = block(x)
      if self.film:
        x = self.films[i](x, cond).astype(self.dtype)
    return nn.relu6(self.bn_head(self.conv_head(x)))

  def __call__(self, images, cond):
    return self.token_learner(self.features(images, cond))


def pretrained_params(path: str | None = None) -> dict[str, Any]:
  """Backbone params (conv_stem, bn_stem, block_i, conv_head, bn_head) from the
  packaged EfficientNet-Lite0 (or a lukemelas-layout .pth), batch norms folded."""
  from qsft_vla.weights import packaged, torch_pth  # pylint: disable=g-import-not-at-top
  sd = torch_pth.load_state_dict(path or packaged.locate("efficientnet_lite0_pth"))
  v = eff.convert_state_dict(sd, num_classes=None)
  return fold_batch_norms(v["params"], v["batch_stats"])


def fold_batch_norms(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
  """EfficientNetLite0 {"params", "batch_stats"} trees -> this module's params."""
  out = {}
  for name, p in params.items():
    if name in stats and "mean" in stats[name]:  # a BatchNorm
      s = np.asarray(p["scale"]) / np.sqrt(np.asarray(stats[name]["var"]) + eff.BN_EPS)
      out[name] = {"scale": s.astype(np.float32),
                   "bias": (np.asarray(p["bias"]) - np.asarray(stats[name]["mean"]) * s
                            ).astype(np.float32)}
    elif isinstance(p, Mapping) and "kernel" not in p:  # a block
      out[name] = fold_batch_norms(p, stats.get(name, {}))
    else:
      out[name] = p
  return out
