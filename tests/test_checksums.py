"""checksums: manifests of folders and what differs from them."""

import hashlib
import os

from qsft_vla import checksums


def _tree(root):
  os.makedirs(root / "a" / "deep")
  os.makedirs(root / "b")
  (root / "a" / "x.bin").write_bytes(b"hello")
  (root / "a" / "deep" / "y.bin").write_bytes(b"")
  (root / "b" / "z.bin").write_bytes(b"12345678")
  (root / "top.json").write_text("{}")   # top-level files are not covered


def test_manifest_known_answer(tmp_path):
  _tree(tmp_path)
  m = checksums.manifest(str(tmp_path))
  assert m == {"a/deep/y.bin": [0, hashlib.sha256(b"").hexdigest()],
               "a/x.bin": [5, hashlib.sha256(b"hello").hexdigest()],
               "b/z.bin": [8, hashlib.sha256(b"12345678").hexdigest()]}
  assert list(checksums.manifest(str(tmp_path), ["b"])) == ["b/z.bin"]
  assert checksums.mismatches(str(tmp_path), m) == []


def test_mismatches_name_each_kind_of_damage(tmp_path):
  _tree(tmp_path)
  m = checksums.manifest(str(tmp_path))
  (tmp_path / "a" / "x.bin").write_bytes(b"hellO")          # same size, other bytes
  (tmp_path / "b" / "z.bin").write_bytes(b"1234")            # truncated
  os.remove(tmp_path / "a" / "deep" / "y.bin")               # missing
  (tmp_path / "b" / "new.bin").write_bytes(b"?")             # added
  (tmp_path / "top.json").write_text("changed")              # not covered
  got = checksums.mismatches(str(tmp_path), m)
  assert got == ["a/deep/y.bin: missing",
                 "a/x.bin: content changed since it was written (sha256 differs)",
                 "b/z.bin: 4 bytes, written with 8",
                 "b/new.bin: not in the manifest (added after the save)"]
  # Restricted to the folders a reader needs.
  assert checksums.mismatches(str(tmp_path), m, ["a"]) == got[:2]
