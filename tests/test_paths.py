"""paths.check_writable_folder: known answers (read-only folders, through the binaries:
tests/bad_inputs/cases.py)."""

import os

import pytest

from qsft_vla import paths


def test_writable_folder_known_answers(tmp_path):
  paths.check_writable_folder(str(tmp_path))                        # exists
  paths.check_writable_folder(str(tmp_path / "new" / "deeper"))     # to be made
  assert os.listdir(tmp_path) == []                                 # creates nothing
  (tmp_path / "a_file").write_text("mine")
  with pytest.raises(NotADirectoryError, match=r"a_file is a file, not a folder"):
    paths.check_writable_folder(str(tmp_path / "a_file" / "out"))
