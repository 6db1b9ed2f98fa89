"""Read torch .pth checkpoints into numpy without torch and without running pickled code.

The packaged ImageNet encoders (DESIGN.md, "No downloads at run time") ship as
torch .pth files. Torch is not a dependency of the package, and `pickle.load`
on a file would run whatever callables the pickle names, so this module reads
both .pth layouts itself:

  legacy (torch < 1.6, what the packaged files use): one stream of pickles --
    magic number, protocol version, sys info, the object (storages as
    persistent ids), the list of storage keys -- followed, per key, by an int64
    element count and the raw little-endian bytes;
  zip (torch >= 1.6): <dir>/data.pkl (the object) and <dir>/data/<key> (one raw
    storage per file).

The unpickler only resolves the globals that rebuild a state dict
(collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter,
torch.<Type>Storage); anything else (os.system, builtins.eval, ...) is refused
before it can be called, with an error naming the global and the file. Tensor
views are bounds-checked against their storage, so a crafted file cannot read
outside it.

  sd = torch_pth.load_state_dict(path)   # {"features.0.0.weight": np.ndarray, ...}
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_PROTOCOL = 1001                 # torch.serialization.PROTOCOL_VERSION


class TorchFileError(ValueError):
  """The file is not a readable torch checkpoint (truncated, corrupt, unknown layout)."""


class UnsafePickleError(TorchFileError):
  """The pickle names a global outside the allow-list; nothing of it was called."""


def _bfloat16():
  import ml_dtypes  # comes with jax; only needed for bfloat16 storages
  return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


class _StorageType:
  """Stands in for torch.<Type>Storage: only its dtype is used."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _bfloat16() if _STORAGE_DTYPES[name] == "bfloat16" else np.dtype(
        _STORAGE_DTYPES[name])


class _Storage:
  """A storage whose bytes may not be read yet (legacy files store them after the pickle)."""

  def __init__(self, dtype: np.dtype, key: str, numel: int, offset: int = 0,
               root: "_Storage | None" = None):
    self.dtype, self.key, self.numel, self.offset = dtype, key, numel, offset
    self.root = root or self     # a legacy view shares its root's bytes
    self.array: np.ndarray | None = None  # root only: 1-D, set once the bytes are read


class _LazyTensor:
  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _as_int_tuple(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) for v in x):
    raise TorchFileError(f"bad tensor {what}: {x!r}")
  return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
    raise TorchFileError(f"bad tensor rebuild arguments: {type(storage).__name__}, "
                         f"{storage_offset!r}")
  return _LazyTensor(storage, storage_offset, _as_int_tuple(size, "size"),
                     _as_int_tuple(stride, "stride"))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only _ALLOWED globals and torch storage types; maps storages to _Storage."""

  def __init__(self, file, path: str, storages: dict[str, _Storage], legacy: bool):
    super().__init__(file)
    self._path, self._storages, self._legacy = path, storages, legacy

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(f"{self._path}: refusing to load global {module}.{name}: only "
                            f"torch tensors and state dicts are read (nothing was executed)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise TorchFileError(f"{self._path}: unsupported persistent id {pid!r}")
    if self._legacy:
      if len(pid) != 6:
        raise TorchFileError(f"{self._path}: bad storage id {pid!r}")
      stype, key, _location, numel, view = pid[1:]
    else:
      if len(pid) != 5:
        raise TorchFileError(f"{self._path}: bad storage id {pid!r}")
      stype, key, _location, numel = pid[1:]
      view = None
    if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
      raise TorchFileError(f"{self._path}: bad storage id {pid!r}")
    key = str(key)
    root = self._storages.setdefault(key, _Storage(stype.dtype, key, numel))
    if view is None:
      return root
    # Legacy view into a root storage: (view_key, element offset, element count).
    try:
      _view_key, offset, view_numel = view
    except (TypeError, ValueError):
      raise TorchFileError(f"{self._path}: bad storage view {view!r}") from None
    if not isinstance(offset, int) or not isinstance(view_numel, int):
      raise TorchFileError(f"{self._path}: bad storage view {view!r}")
    return _Storage(root.dtype, key, view_numel, offset, root)


def _materialize(t: _LazyTensor, path: str) -> np.ndarray:
  s = t.storage
  base = s.root.array
  if base is None:
    raise TorchFileError(f"{path}: storage {s.key} has no data")
  start = s.offset + t.offset
  limit = s.offset + s.numel
  if any(v < 0 for v in t.size) or any(v < 0 for v in t.stride) or len(t.size) != len(t.stride):
    raise TorchFileError(f"{path}: bad tensor shape {t.size} / stride {t.stride}")
  if s.offset < 0 or s.offset + s.numel > base.size or start < 0:
    raise TorchFileError(f"{path}: storage view out of bounds in storage {s.key}")
  if s.root is s:
    limit = base.size
  if 0 in t.size:
    return np.zeros(t.size, base.dtype)
  last = start + sum((n - 1) * st for n, st in zip(t.size, t.stride))
  if last >= limit:
    raise TorchFileError(f"{path}: tensor of shape {t.size} reads past storage {s.key} "
                         f"({s.numel} elements)")
  numel = int(np.prod(t.size, dtype=object))
  if numel > max(s.numel, 1 << 28):  # zero strides (expand) may repeat data, but not unboundedly
    raise TorchFileError(f"{path}: tensor of shape {t.size} is far larger than its storage")
  item = base.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(base[start:], shape=t.size,
                                         strides=tuple(st * item for st in t.stride),
                                         writeable=False)
  return np.array(view)  # own the memory, native byte order below


def _resolve(obj: Any, path: str) -> Any:
  if isinstance(obj, _LazyTensor):
    a = _materialize(obj, path)
    return a.astype(a.dtype.newbyteorder("=")) if not a.dtype.isnative else a
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, path)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, path) for v in obj)
  if isinstance(obj, _Storage):
    raise TorchFileError(f"{path}: bare storages are not supported")
  return obj


def _load_legacy(f, path: str) -> tuple[Any, dict[str, _Storage]]:
  size = os.fstat(f.fileno()).st_size
  storages: dict[str, _Storage] = {}
  unp = lambda: _RestrictedUnpickler(f, path, storages, legacy=True).load()
  if unp() != _MAGIC:
    raise TorchFileError(f"{path}: not a torch checkpoint (bad magic number)")
  if unp() != _PROTOCOL:
    raise TorchFileError(f"{path}: unsupported torch protocol version")
  sys_info = unp()
  little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
  obj = unp()
  keys = unp()
  if not isinstance(keys, list):
    raise TorchFileError(f"{path}: bad storage key list")
  for key in keys:
    key = str(key)
    if key not in storages:
      raise TorchFileError(f"{path}: storage key {key} is not referenced by the pickle")
    s = storages[key]
    head = f.read(8)
    if len(head) != 8:
      raise TorchFileError(f"{path}: truncated (storage {key} header missing)")
    (numel,) = struct.unpack("<q" if little else ">q", head)
    if numel != s.numel:
      raise TorchFileError(f"{path}: storage {key} holds {numel} elements, the pickle says "
                           f"{s.numel}")
    dtype = s.dtype.newbyteorder("<" if little else ">")
    nbytes = numel * dtype.itemsize
    if nbytes > size - f.tell():  # check before allocating what a crafted header asks for
      raise TorchFileError(f"{path}: truncated (storage {key}: {size - f.tell()} of {nbytes} "
                           f"bytes)")
    data = f.read(nbytes)
    s.array = np.frombuffer(data, dtype)
  return obj, storages


def _load_zip(zf: zipfile.ZipFile, path: str) -> tuple[Any, dict[str, _Storage]]:
  pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise TorchFileError(f"{path}: zip archive without a single <dir>/data.pkl")
  prefix = pkls[0][:-len("data.pkl")]
  little = True
  if prefix + "byteorder" in zf.namelist():
    little = zf.read(prefix + "byteorder").strip() != b"big"
  storages: dict[str, _Storage] = {}
  obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path, storages, legacy=False).load()
  for key, s in storages.items():
    name = f"{prefix}data/{key}"
    try:
      data = zf.read(name)
    except KeyError:
      raise TorchFileError(f"{path}: storage record {name} is missing") from None
    dtype = s.dtype.newbyteorder("<" if little else ">")
    if len(data) != s.numel * dtype.itemsize:
      raise TorchFileError(f"{path}: storage {key} has {len(data)} bytes, expected "
                           f"{s.numel * dtype.itemsize}")
    s.array = np.frombuffer(data, dtype)
  return obj, storages


def load(path: str) -> Any:
  """The object saved in a .pth file, with every tensor as a numpy array."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      is_zip = f.read(4) == b"PK\x03\x04"  # like torch: by the first local header
    if is_zip:
      with zipfile.ZipFile(path) as zf:
        obj, _ = _load_zip(zf, path)
    else:
      with open(path, "rb") as f:
        obj, _ = _load_legacy(f, path)
    return _resolve(obj, path)
  except TorchFileError as e:
    if path in str(e):
      raise
    raise type(e)(f"{path}: {e}") from e
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
          KeyError, IndexError, AttributeError, struct.error, UnicodeDecodeError,
          OverflowError, MemoryError, RecursionError) as e:
    raise TorchFileError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict as {name: np.ndarray}; unwraps {"state_dict": ...} / {"model": ...}."""
  obj = load(path)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise TorchFileError(f"{path}: entries that are not tensors: {bad[:5]}")
  return dict(obj)
