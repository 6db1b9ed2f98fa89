"""Meta-World v3 (Sawyer arm in MuJoCo): xyz end-effector deltas + gripper.

Actions are 4 continuous dimensions in [-1, 1] (the environment clips to this
box), 256 bins each. Observation: one 64x64 RGB camera and the 39-dim state.
Usage: --config=robot_configs/metaworld.py[:variant]
"""

from qsft_vla import config as qconfig


def get_config(variant: str = "default"):
  if variant not in ("default",):
    raise qconfig.ConfigError(f"robot_configs/metaworld.py: unknown variant {variant!r}; "
                              "known: default")
  c = qconfig.base_config()
  r = c.robot
  r.name = "metaworld_sawyer"
  r.control_hz = 80.0  # MuJoCo timestep 2.5 ms x frame_skip 5
  r.cameras = {"image": {"height": 64, "width": 64}}
  r.state_dim = 39
  r.instruction.source = "step"
  r.action.names = ("dx", "dy", "dz", "gripper")
  r.action.dims = {n: qconfig.continuous_dim(-1.0, 1.0, bins=256) for n in r.action.names}
  r.action.out_of_bounds = "clip"  # noisy scripted actions exceed the box; the env clips too
  r.rlds_keys.cameras = {"image": "observation/image"}
  c.data.reward_rescale = "auto"
  c.learner.gamma = 0.99
  return c
