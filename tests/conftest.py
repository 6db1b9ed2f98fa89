"""Shared fixtures: robot specs from the real config files, tiny hand-built episodes,
small real BabyAI datasets."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from qsft_vla import config as qconfig  # noqa: E402
from qsft_vla.robot import RobotSpec  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BABYAI_CONFIG = os.path.join(REPO, "robot_configs", "babyai.py")


def babyai_dataset(tmp_path_factory, episodes: int, max_steps: int) -> str:
  """A real BabyAI GoToLocal RLDS dataset (the bot at noise 0 and 1, seed 0)."""
  from data_tools import generate  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("data") / "babyai")
  generate.generate("babyai:BabyAI-GoToLocal-v0", episodes=episodes, noise_levels=[0.0, 1.0],
                    seed=0, out=out, max_steps=max_steps, workers=1, progress=False)
  return out


def free_port() -> int:
  """A localhost port nobody listens on (the OS picks it)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def robot_spec(name: str) -> RobotSpec:
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", f"{name}.py"))
  return RobotSpec.from_config(cfg.robot)


@pytest.fixture
def metaworld_spec():
  return robot_spec("metaworld")


@pytest.fixture
def babyai_spec():
  return robot_spec("babyai")


def make_episode(spec: RobotSpec, length: int, seed: int = 0, terminal: bool = True,
                 instruction: str = "do the task"):
  """A valid random episode for `spec`; success (reward 1, terminal) at the end if `terminal`."""
  rng = np.random.RandomState(seed)
  obs = {c.name: rng.randint(0, 256, (length, c.height, c.width, 3), dtype=np.uint8)
         for c in spec.cameras}
  if spec.state_dim:
    obs["state"] = rng.randn(length, spec.state_dim).astype(np.float32)
  actions = []
  for d in spec.action_dims:
    if d.kind == "discrete":
      actions.append(rng.choice(d.values, size=length))
    else:
      actions.append(rng.uniform(d.low, d.high, size=length))
  reward = np.zeros(length, np.float32)
  if terminal:
    reward[-1] = 1.0
  t = np.arange(length)
  return {"steps": {"observation": obs,
                    "action": np.stack(actions, axis=1).astype(np.float32),
                    "reward": reward, "discount": np.ones(length, np.float32),
                    "is_first": t == 0, "is_last": t == length - 1,
                    "is_terminal": (t == length - 1) & terminal,
                    "language_instruction": [instruction] * length},
          "episode_metadata": {"noise": 0.0}}


# Modules a robot host (and a new-jax GPU host) does not have.
TF_MODULES = ("tensorflow", "tensorflow_datasets", "reverb", "rlds")
# The robot host's import path (Controller, evaluation) also leaves out the
# training-only optimiser library.
ROBOT_HOST_ABSENT = TF_MODULES + ("optax",)


def _absent(modules) -> str:
  """Code that marks `modules` not installed, as a robot host sees them: a None
  entry in sys.modules makes `import` raise ModuleNotFoundError and
  importlib.util.find_spec return None (orbax, through etils.epath, asks
  find_spec whether TF is installed)."""
  return textwrap.dedent(f"""
      import sys
      for _name in {tuple(modules)!r}:
        sys.modules[_name] = None
  """)


def _none_loaded(modules) -> str:
  return textwrap.dedent(f"""
      _loaded = [m for m, mod in sys.modules.items()
                 if mod is not None and m.split(".")[0] in {tuple(modules)!r}]
      assert not _loaded, _loaded
  """)


def run_without_tensorflow(code: str, timeout: float = 300, absent=TF_MODULES) -> str:
  """Runs `code` in a fresh interpreter that sees `absent` (TF, TFDS, Reverb and
  rlds; ROBOT_HOST_ABSENT adds optax) as not installed, then checks none of them
  got loaded; returns its stdout."""
  proc = subprocess.run([sys.executable, "-c", _absent(absent) + textwrap.dedent(code)
                         + _none_loaded(absent)],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout
