"""Pretrained image encoders (EfficientNet-Lite0, MobileNetV2) against torch and a known image.

tests/data/grace_hopper.jpg is matplotlib's sample image (mpl-data/sample_data,
public-domain US Navy photograph), copied from the matplotlib wheel; the
classic ImageNet answer for it is "military uniform" (class 652).
Torch is used only here, as the reference: each test builds the same network
in plain torch, loads the packaged state dict into it (strict), and compares.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qsft_vla.weights import packaged, torch_pth

import torch  # a test dependency (pyproject [test]): the reference implementation
F = torch.nn.functional
nn = torch.nn

IMAGE = os.path.join(os.path.dirname(__file__), "data", "grace_hopper.jpg")
MILITARY_UNIFORM = 652


def _state_dict(name):
  return torch_pth.load_state_dict(packaged.locate(name))


def center_crop_224(path=IMAGE, resize=256):
  """Shorter side -> 256 (bilinear), center 224x224 crop: uint8 [1, 224, 224, 3]."""
  img = Image.open(path).convert("RGB")
  w, h = img.size
  s = resize / min(w, h)
  img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
  w, h = img.size
  l, t = (w - 224) // 2, (h - 224) // 2
  return np.asarray(img.crop((l, t, l + 224, t + 224)))[None]


def _top5(logits):
  p = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))[0]
  top = np.argsort(-p)[:5]
  return [(int(i), float(p[i])) for i in top]


# ---------------- EfficientNet-Lite0 ----------------

def _tf_same_pad(x, k, s):
  ih, iw = x.shape[-2:]
  ph = max((-(-ih // s) - 1) * s + k - ih, 0)
  pw = max((-(-iw // s) - 1) * s + k - iw, 0)
  return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class _TorchMBConv(nn.Module):
  def __init__(self, cin, cout, k, s, e):
    super().__init__()
    mid = cin * e
    self.k, self.s, self.e, self.res = k, s, e, s == 1 and cin == cout
    if e != 1:
      self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
      self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
    self._depthwise_conv = nn.Conv2d(mid, mid, k, s, groups=mid, bias=False)
    self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
    self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
    self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)

  def forward(self, x):
    h = x
    if self.e != 1:
      h = F.relu6(self._bn0(self._expand_conv(h)))
    h = F.relu6(self._bn1(self._depthwise_conv(_tf_same_pad(h, self.k, self.s))))
    h = self._bn2(self._project_conv(h))
    return h + x if self.res else h


class _TorchEfficientNetLite0(nn.Module):
  """lukemelas/ml-illustrated EfficientNet-Lite0, written out independently."""

  def __init__(self):
    super().__init__()
    stages = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
    self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
    self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
    blocks, cin = [], 32
    for r, k, s, e, c in stages:
      for i in range(r):
        blocks.append(_TorchMBConv(cin, c, k, s if i == 0 else 1, e))
        cin = c
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
    self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
    self._fc = nn.Linear(1280, 1000)

  def features(self, x):
    x = F.relu6(self._bn0(self._conv_stem(_tf_same_pad(x, 3, 2))))
    for b in self._blocks:
      x = b(x)
    return F.relu6(self._bn1(self._conv_head(x)))

  def forward(self, x):
    return self._fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def lite0():
  from qsft_vla.models import efficientnet
  sd = _state_dict("efficientnet_lite0_pth")
  module, variables = efficientnet.EfficientNetLite0(), efficientnet.convert_state_dict(sd)
  ref = _TorchEfficientNetLite0().eval()
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  both = jax.jit(lambda v, x: module.apply(v, x, method=lambda m, x: (m(x), m.features(x))))
  return module, variables, jax.jit(module.apply), ref, both


def test_efficientnet_lite0_known_image(lite0):
  from qsft_vla.models import efficientnet
  _, variables, apply, _, _ = lite0
  top5 = _top5(apply(variables, efficientnet.normalize(center_crop_224())))
  print("EfficientNet-Lite0 grace_hopper top-5 (class, prob):", top5)
  assert MILITARY_UNIFORM in [c for c, _ in top5]


@pytest.mark.parametrize("hw", [(224, 224), pytest.param((160, 200), marks=pytest.mark.slow)])
def test_efficientnet_lite0_matches_torch(lite0, hw):
  _, variables, _, ref, both = lite0
  x = np.random.RandomState(0).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_logits = ref(tx).numpy()
    want_fmap = ref.features(tx).numpy().transpose(0, 2, 3, 1)
  got, fmap = map(np.asarray, both(variables, x))
  assert fmap.shape == (2, -(-hw[0] // 32), -(-hw[1] // 32), 1280)
  d_logits, d_fmap = np.abs(got - want_logits).max(), np.abs(fmap - want_fmap).max()
  print(f"EfficientNet-Lite0 {hw}: max|flax - torch| logits {d_logits:.2e}, features {d_fmap:.2e}")
  assert d_logits < 1e-3 and d_fmap < 1e-3


def test_efficientnet_lite0_without_classifier():
  from qsft_vla.models import efficientnet
  module, variables = efficientnet.load_efficientnet_lite0(num_classes=None)
  assert "classifier" not in variables["params"]
  n = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
  assert n == 4_652_008 - 1_281_000  # Lite0 has 4.65M parameters; the classifier 1.28M
  out = jax.jit(module.apply)(variables, jnp.zeros((1, 64, 64, 3)))
  assert out.shape == (1, 1280)


# ---------------- MobileNetV2 (torchvision layout) ----------------

def _conv_bn_relu(cin, cout, k, s, groups=1):
  return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU6())


class _TorchInvertedResidual(nn.Module):
  def __init__(self, cin, cout, s, t):
    super().__init__()
    mid = cin * t
    layers = [_conv_bn_relu(cin, mid, 1, 1)] if t != 1 else []
    layers += [_conv_bn_relu(mid, mid, 3, s, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
               nn.BatchNorm2d(cout)]
    self.conv = nn.Sequential(*layers)
    self.res = s == 1 and cin == cout

  def forward(self, x):
    return x + self.conv(x) if self.res else self.conv(x)


class _TorchMobileNetV2(nn.Module):
  """torchvision.models.mobilenet_v2, written out independently (no torchvision here)."""

  def __init__(self):
    super().__init__()
    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
    feats, cin = [_conv_bn_relu(3, 32, 3, 2)], 32
    for t, c, n, s in settings:
      for i in range(n):
        feats.append(_TorchInvertedResidual(cin, c, s if i == 0 else 1, t))
        cin = c
    feats.append(_conv_bn_relu(320, 1280, 1, 1))
    self.features = nn.Sequential(*feats)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def mobilenet():
  from qsft_vla.models import mobilenet as mn
  sd = _state_dict("mobilenet_v2_pth")
  module, variables = mn.MobileNetV2(), mn.convert_state_dict(sd)
  ref = _TorchMobileNetV2().eval()
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  both = jax.jit(lambda v, x: module.apply(v, x, method=lambda m, x: (m(x), m.features(x))))
  return variables, jax.jit(module.apply), ref, both


def test_mobilenet_v2_known_image(mobilenet):
  from qsft_vla.models import mobilenet as mn
  variables, apply, _, _ = mobilenet
  top5 = _top5(apply(variables, mn.normalize(center_crop_224())))
  print("MobileNetV2 grace_hopper top-5 (class, prob):", top5)
  assert MILITARY_UNIFORM in [c for c, _ in top5]


@pytest.mark.parametrize("hw", [(224, 224), pytest.param((160, 200), marks=pytest.mark.slow)])
def test_mobilenet_v2_matches_torch(mobilenet, hw):
  variables, _, ref, both = mobilenet
  x = np.random.RandomState(1).normal(0, 1, (2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_logits = ref(tx).numpy()
    want_fmap = ref.features(tx).numpy().transpose(0, 2, 3, 1)
  got, fmap = map(np.asarray, both(variables, x))
  assert fmap.shape == (2, -(-hw[0] // 32), -(-hw[1] // 32), 1280)
  d_logits, d_fmap = np.abs(got - want_logits).max(), np.abs(fmap - want_fmap).max()
  print(f"MobileNetV2 {hw}: max|flax - torch| logits {d_logits:.2e}, features {d_fmap:.2e}")
  assert d_logits < 1e-3 and d_fmap < 1e-3


def test_mobilenet_v2_without_classifier():
  from qsft_vla.models import mobilenet as mn
  module, variables = mn.load_mobilenet_v2(num_classes=None)
  n = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
  assert n == 3_504_872 - 1_281_000  # torchvision: 3,504,872 parameters with the classifier
  out = jax.jit(module.apply)(variables, jnp.zeros((1, 64, 64, 3)))
  assert out.shape == (1, 1280)


@pytest.mark.slow  # a fresh interpreter (~10 s)
def test_encoders_need_neither_torch_nor_tensorflow():
  from conftest import run_without_tensorflow
  out = run_without_tensorflow("""
    for _name in ("torch", "torchvision", "transformers"):
      sys.modules[_name] = None
    import jax, jax.numpy as jnp
    from qsft_vla.models import efficientnet, minilm, mobilenet
    x = jnp.zeros((1, 64, 64, 3))
    for load in (efficientnet.load_efficientnet_lite0, mobilenet.load_mobilenet_v2):
      module, variables = load()
      assert jax.jit(module.apply)(variables, x).shape == (1, 1000)
    assert minilm.MiniLMSentenceEncoder.from_package(max_len=8).encode(["hi"]).shape == (1, 384)
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                and sys.modules[m] is not None]
    print("NO-TORCH OK")
  """)
  assert "NO-TORCH OK" in out
