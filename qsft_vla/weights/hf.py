"""Hugging Face checkpoint folders (config.json + safetensors + tokenizer.json) as numpy.

Every pretrained model here ends up as an HF-style folder: the packaged MiniLM
folder as shipped, SmolLM2 after converting its GGUF (gguf_convert.py), and a
user's own hub checkpoint copied onto the machine. One reader for all of them
means the code tested on the packaged folders is the code that loads real ones
(DESIGN.md, "No downloads at run time").

Why a small reader of our own instead of `safetensors.numpy.load_file`: numpy
has no bfloat16, and most hub checkpoints are bf16; safetensors' numpy loader
refuses them. The format is trivial (8-byte little-endian header length, a JSON
header, raw little-endian bytes), so we read it directly, widen bf16 to float32
and name the file and tensor in every error. No pickle and no torch: a
checkpoint folder cannot run code.

  ckpt = hf.load_folder("/path/to/folder")        # HFCheckpoint
  ckpt.config["hidden_size"], ckpt.tensors["model.norm.weight"]
  hf.save_folder(out, config, tensors, tokenizer_json=None)   # atomic
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import struct
import tempfile
from typing import Optional

import numpy as np

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"

_MAX_HEADER = 100 << 20  # a header bigger than this is not a safetensors file

# safetensors dtype tag -> numpy dtype of the stored bytes (little-endian).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 below
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_TAGS = {v: k for k, v in _DTYPES.items() if k != "BF16"}


class CheckpointError(ValueError):
  """An HF checkpoint folder is missing a file, or a file in it is malformed."""


@dataclasses.dataclass
class HFCheckpoint:
  path: str                                  # the folder
  config: dict                               # config.json
  tensors: dict[str, np.ndarray]             # by HF name; numpy, original dtype (bf16 -> float32)
  tokenizer_path: Optional[str]              # tokenizer.json if present


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(file: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (bf16 widened to float32)."""
  try:
    with open(file, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      if size < 8:
        raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes)")
      # mmap: each tensor is copied out once, the file is never held twice in memory.
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return _parse(file, m, size)
  except OSError as e:
    raise CheckpointError(f"{file}: cannot read safetensors file: {e}") from e


def _parse(file: str, m, size: int) -> dict[str, np.ndarray]:
  (n,) = struct.unpack("<Q", m[:8])
  if n > _MAX_HEADER or 8 + n > size:
    raise CheckpointError(f"{file}: not a safetensors file (header length {n} for a "
                          f"{size}-byte file); truncated or another format")
  try:
    header = json.loads(m[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: safetensors header is not valid JSON: {e}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: safetensors header is not a JSON object")
  start, nbody = 8 + n, size - 8 - n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      tag, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry {info!r}") from e
    if tag not in _DTYPES:
      raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {tag} "
                            f"(supported: {', '.join(sorted(_DTYPES))})")
    dt = _DTYPES[tag]
    count = int(np.prod(shape, dtype=np.int64))
    if not (0 <= begin <= end <= nbody) or end - begin != count * dt.itemsize:
      raise CheckpointError(f"{file}: tensor {name!r} ({tag} {shape}) has byte range "
                            f"[{begin}, {end}) that does not fit its shape or the file "
                            f"({nbody} data bytes); the file is truncated or corrupt")
    arr = np.frombuffer(m, dtype=dt, count=count, offset=start + begin).reshape(shape).copy()
    out[name] = _bf16_to_f32(arr) if tag == "BF16" else arr
  return out


def write_safetensors(file: str, tensors: dict[str, np.ndarray],
                      metadata: Optional[dict[str, str]] = None) -> None:
  """Writes numpy tensors as one .safetensors file (readable by HF and by read_safetensors)."""
  # transformers refuses files whose format is not one of pt/tf/flax/mlx; the bytes are the same.
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  arrays, offset = [], 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if dt not in _TAGS:
      raise CheckpointError(f"{file}: tensor {name!r} has dtype {arr.dtype}, which safetensors "
                            f"cannot store (use one of {', '.join(sorted(map(str, _TAGS)))})")
    shape = list(arr.shape)  # before ascontiguousarray, which makes 0-d arrays 1-d
    arr = np.ascontiguousarray(arr, dtype=dt)
    header[name] = {"dtype": _TAGS[dt], "shape": shape,
                    "data_offsets": [offset, offset + arr.nbytes]}
    arrays.append(arr)
    offset += arr.nbytes
  head = json.dumps(header, separators=(",", ":")).encode("utf-8")
  head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for arr in arrays:
      f.write(memoryview(arr.reshape(-1)).cast("B"))  # no extra copy of big tensors


def _shard_files(path: str) -> list[str]:
  """The safetensors files of a folder: the single file, or the shards of the index."""
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a valid safetensors index "
                            f"(needs a 'weight_map' object): {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
    if missing:
      raise CheckpointError(f"{index} names shards that are missing from {path}: "
                            f"{', '.join(missing)}")
    return [os.path.join(path, s) for s in files]
  single = os.path.join(path, SINGLE)
  if os.path.isfile(single):
    return [single]
  others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(others) == 1:
    return [os.path.join(path, others[0])]
  hint = (f" (found {', '.join(others)} but no {INDEX} saying which to use)" if others else
          " (a pytorch_model.bin checkpoint is not read: it is a pickle)"
          if os.path.exists(os.path.join(path, "pytorch_model.bin")) else "")
  raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX}{hint}")


def load_folder(path: str, dtype=None) -> HFCheckpoint:
  """Loads an HF checkpoint folder: config.json, all safetensors tensors, tokenizer.json's path.

  `dtype`, if given, casts the floating-point tensors (integer tensors keep theirs).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint folder does not exist")
  cfg_file = os.path.join(path, CONFIG)
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path}: no {CONFIG} (an HF checkpoint folder needs config.json "
                          f"beside its safetensors)")
  try:
    with open(cfg_file, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{cfg_file}: cannot read: {e}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{cfg_file}: is not a JSON object")
  tensors: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for file in _shard_files(path):
    for name, arr in read_safetensors(file).items():
      if name in tensors:
        raise CheckpointError(f"{path}: tensor {name!r} is in both {os.path.basename(origin[name])} "
                              f"and {os.path.basename(file)}")
      if dtype is not None and np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(dtype, copy=False)
      tensors[name], origin[name] = arr, file
  if not tensors:
    raise CheckpointError(f"{path}: the safetensors files hold no tensors")
  tok = os.path.join(path, TOKENIZER)
  return HFCheckpoint(path, config, tensors, tok if os.path.isfile(tok) else None)


def save_folder(path: str, config: dict, tensors: dict[str, np.ndarray],
                tokenizer_json: Optional[str] = None) -> str:
  """Writes config.json + model.safetensors (+ tokenizer.json) as a folder, atomically.

  Everything goes to a temporary folder beside `path`, which is then renamed, so
  a reader never sees a half-written checkpoint. An existing `path` is replaced.
  `tokenizer_json` is the tokenizer's JSON text (e.g. `Tokenizer.to_str()`).
  Returns the absolute path.
  """
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is not
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(tmp, SINGLE), tensors)
    if tokenizer_json is not None:
      with open(os.path.join(tmp, TOKENIZER), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)
    if os.path.isdir(path):
      # Move the old folder aside first: rename onto a non-empty folder fails.
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
