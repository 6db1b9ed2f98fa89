"""Where the binaries may write: one check for train's workdir, evaluate's results
folder and the dataset writer's --out.

The bottom of the import graph, beside errors.py: it imports nothing of the package.
"""

from __future__ import annotations

import os
import tempfile


def check_writable_folder(path: str) -> None:
  """Raises unless files can be created at `path` (an existing folder, or one to be
  made): NotADirectoryError if its nearest existing ancestor is a file,
  PermissionError if a test write there fails. A real write, because os.access
  says yes to root on a read-only mount or an immutable folder. Creates nothing."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"{existing} is a file, not a folder")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise PermissionError(f"{existing} is not writable ({e.strerror})") from None
