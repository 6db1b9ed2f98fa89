"""The corpus's shared inputs: a tiny BabyAI RLDS dataset, a tiny Q-SFT checkpoint and a
tiny LeRobotDataset (v3.0 layout).

Built once (by the test's module fixture, or by `harness.py --entry=all`) in the
process that starts the drivers, never in a driver: TF and jax must not have run
in a process before it forks.
"""

import os

from checkpoint_fixture import write_checkpoint
from conftest import babyai_dataset
from lerobot_fixture import write_lerobot


class _Folders:
  """The one method of pytest's tmp_path_factory that babyai_dataset uses."""

  def __init__(self, root):
    self.root = root

  def mktemp(self, name):
    path = os.path.join(self.root, name)
    os.makedirs(path)
    return _Path(path)


class _Path(str):
  def __truediv__(self, other):
    return os.path.join(self, other)


def make(root, folders=None) -> dict[str, str]:
  """name -> path of every fixture the cases use. `folders`: a tmp_path_factory."""
  folders = folders or _Folders(root)
  return {"babyai_data": babyai_dataset(folders, episodes=4, max_steps=12),
          "qsft_run": write_checkpoint(folders.mktemp("run"), "babyai", "qsft", step=2),
          "lerobot": write_lerobot(folders.mktemp("lerobot") / "dataset")[0]}
