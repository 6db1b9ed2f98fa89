"""What every data_tools binary does around its work: quiet logs, load the robot, report errors.

Bad input (DataError, ConfigError: both ValueErrors) and file problems end the
binary with one clear line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from qsft_vla.config import load_config_file
from qsft_vla.robot import RobotSpec


def dir_bytes(path: str) -> int:
  """Bytes on disk under `path` (for the size figures the tools print)."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def quiet_logging() -> None:
  """TFDS logs every file it opens at INFO; keep that unless --verbosity is given."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def load_robot(config: str) -> RobotSpec:
  """The robot of a config file given as `robot_configs/<x>.py[:variant]`."""
  return RobotSpec.from_config(load_config_file(config).robot, where=config)


def run(tool: str, work: Callable[[], str]) -> int:
  """Runs `work` (which returns the text to print); errors become `tool: error: ...`, exit 1."""
  quiet_logging()
  try:
    text = work()
  except (ValueError, OSError) as e:
    print(f"{tool}: error: {e}", file=sys.stderr)
    return 1
  print(text)
  return 0
