"""Shared by the benchmark scripts: print a result table and optionally write it."""

import os


def emit(text: str, out: str | None) -> None:
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
