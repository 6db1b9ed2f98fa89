"""qsft_vla.weights.torch_pth: torch-free, code-free .pth reading (torch only as the reference)."""

import collections
import io
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest

from qsft_vla.weights import packaged, torch_pth

import torch  # a test dependency (pyproject [test]): the reference implementation


@pytest.mark.parametrize("name", ["efficientnet_lite0_pth", "mobilenet_v2_pth"])
def test_packaged_files_equal_torch_load(name):
  path = packaged.locate(name)
  sd = torch_pth.load_state_dict(path)
  ref = torch.load(path, map_location="cpu", weights_only=True)
  assert list(sd) == list(ref)
  for k, t in ref.items():
    a = sd[k]
    assert a.dtype == t.numpy().dtype and a.shape == tuple(t.shape), k
    np.testing.assert_array_equal(a, t.numpy(), err_msg=k)


def _tensors():
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return collections.OrderedDict([
      ("w", base),
      ("view", base[1:, ::2]),                 # shares base's storage: offset + strides
      ("t", base.t()),                         # transposed strides
      ("scalar", torch.tensor(7, dtype=torch.int64)),
      ("bf16", torch.linspace(-2, 2, 5, dtype=torch.bfloat16)),
      ("half", torch.randn(3, 2).half()),
      ("mask", torch.tensor([True, False, True])),
      ("u8", torch.arange(5, dtype=torch.uint8)),
      ("empty", torch.zeros(0, 3)),
      ("param", torch.nn.Parameter(torch.ones(2, 2))),
  ])


@pytest.mark.parametrize("zip_format", [True, False])
def test_roundtrip_formats_views_and_dtypes(tmp_path, zip_format):
  sd = _tensors()
  path = str(tmp_path / "t.pth")
  torch.save({"state_dict": sd, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  got = torch_pth.load_state_dict(path)  # unwraps {"state_dict": ...}
  assert list(got) == list(sd)
  for k, t in sd.items():
    ref = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
    a = got[k].astype(np.float32) if t.dtype == torch.bfloat16 else got[k]
    assert a.shape == ref.shape and a.dtype == ref.dtype, k
    np.testing.assert_array_equal(a, ref, err_msg=k)
  assert torch_pth.load(path)["epoch"] == 3


class _Evil:
  """Pickles to `callable(*args)`: what a malicious checkpoint runs under plain pickle.load."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _legacy_stream(obj) -> bytes:
  buf = io.BytesIO()
  for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, obj, []):
    pickle.dump(part, buf, protocol=2)
  return buf.getvalue()


def _zip_archive(data_pkl: bytes, storages=None) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", data_pkl)
    for key, data in (storages or {}).items():
      z.writestr(f"archive/data/{key}", data)
    z.writestr("archive/version", "3\n")
  return buf.getvalue()


@pytest.mark.parametrize("layout", ["zip", "legacy", "legacy_magic"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.call"])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, layout, attack):
  marker = tmp_path / "pwned"
  if attack == "os.system":
    evil = _Evil(os.system, f"touch {marker}")
  elif attack == "builtins.eval":
    evil = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
  else:
    evil = _Evil(subprocess.call, ["touch", str(marker)])
  payload = {"weight": evil}
  if layout == "zip":
    data = _zip_archive(pickle.dumps(payload, protocol=2))
  elif layout == "legacy":
    data = _legacy_stream(payload)
  else:  # the very first pickle of the stream (the magic number slot)
    data = pickle.dumps(evil, protocol=2) + _legacy_stream({})
  path = tmp_path / "evil.pth"
  path.write_bytes(data)
  with pytest.raises(torch_pth.UnsafePickleError) as e:
    torch_pth.load_state_dict(str(path))
  msg = str(e.value)
  fn_name = attack.split(".")[1]
  assert f".{fn_name}" in msg and str(path) in msg, msg
  assert not marker.exists()


def test_refuses_other_torch_globals(tmp_path):
  # Only tensor-rebuilding globals are allowed, not anything under torch.
  data = _legacy_stream({"x": _Evil(torch.load, "/nonexistent")})
  path = tmp_path / "x.pth"
  path.write_bytes(data)
  with pytest.raises(torch_pth.UnsafePickleError, match=r"torch\.serialization\.load"):
    torch_pth.load(str(path))


class _StorageRef:
  pass


class _StoragePickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ("storage", torch.FloatStorage, "0", "cpu", 4)
    return None


@pytest.mark.parametrize("size,stride,match", [
    ((100,), (1,), "reads past storage"),            # would read foreign memory
    ((3,), (-1,), "bad tensor shape"),
    ((1 << 20, 1 << 20), (0, 0), "far larger"),     # 4 TiB from 16 bytes
])
def test_crafted_tensor_views_are_refused(tmp_path, size, stride, match):
  st = _StorageRef()
  big = _Evil(torch._utils._rebuild_tensor_v2, st, 0, size, stride, False,
              collections.OrderedDict())
  buf = io.BytesIO()
  _StoragePickler(buf, protocol=2).dump({"w": big})
  path = tmp_path / "oob.pth"
  path.write_bytes(_zip_archive(buf.getvalue(), {"0": np.zeros(4, np.float32).tobytes()}))
  with pytest.raises(torch_pth.TorchFileError, match=match):
    torch_pth.load_state_dict(str(path))


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_or_corrupt_files_fail_clearly(tmp_path, zip_format):
  path = tmp_path / "ok.pth"
  torch.save({"w": torch.randn(64, 64)}, str(path), _use_new_zipfile_serialization=zip_format)
  data = path.read_bytes()
  for i, bad in enumerate([data[: len(data) // 2], data[:-100], data[:10], b"",
                           os.urandom(2000)]):
    p = tmp_path / f"bad{i}.pth"
    p.write_bytes(bad)
    with pytest.raises(torch_pth.TorchFileError) as e:
      torch_pth.load_state_dict(str(p))
    assert str(p) in str(e.value)


def test_not_a_state_dict(tmp_path):
  path = tmp_path / "list.pth"
  torch.save([torch.ones(2)], str(path))
  with pytest.raises(torch_pth.TorchFileError, match="not a state dict"):
    torch_pth.load_state_dict(str(path))
