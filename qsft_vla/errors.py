"""The package's error types and the one field check every schema uses.

The bottom of the import graph: this module imports nothing of the package,
so any module (the config schema, the robot spec, the learner, the robot-host
Controller) can raise these without importing the layers above it. Each type
is re-exported where it is raised (e.g. `checkpoints.CheckpointError`), and
all of them can be caught from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional


def instruction_problem(text: str, require_text: bool = True) -> Optional[str]:
  """Why `text` cannot be an instruction, or None. One rule for the data (every
  episode's instructions) and the robot host (Controller.reset), so a dataset
  never holds an instruction the policy could not be given. require_text=False
  (a robot whose instruction is fixed: the steps' text is not read) checks only
  that it can be stored."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a bad decode upstream
    return f"not valid Unicode text ({e.reason} at index {e.start})"
  if require_text and not any(ch.isalnum() for ch in text):  # blank, or only invisible marks
    return "no letter or digit (blank, or only invisible marks such as zero-width spaces)"
  return None


class ConfigError(ValueError):
  """A config file or field is wrong; the message names the field."""


class DataError(ValueError):
  """Bad data; the message names the file/episode, step and key."""

  def __init__(self, where: str, what: str, step: int | None = None, key: str | None = None):
    self.where, self.step, self.key, self.what = where, step, key, what
    loc = where
    if step is not None:
      loc += f", step {step}"
    if key is not None:
      loc += f", key {key!r}"
    super().__init__(f"{loc}: {what}")


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not match what loads it."""


class DamagedCheckpointError(CheckpointError):
  """A step's files differ from the checksum manifest written when it was saved."""


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became non-finite); the message says why."""


def check_dataclass_fields(cls, d: Mapping[str, Any]) -> None:
  """Fails with the unknown field(s) named when `d` has keys `cls` (a dataclass) lacks."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
