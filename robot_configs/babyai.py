"""BabyAI (minigrid): an agent in a grid world following a language mission.

One discrete action per step (the 7 minigrid actions), a 56x56 RGB egocentric
partial view (7x7 cells, 8 px each), the mission string as the instruction.
Usage: --config=robot_configs/babyai.py[:variant]
"""

from qsft_vla import config as qconfig

MINIGRID_ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")


def get_config(variant: str = "default"):
  if variant not in ("default",):
    raise qconfig.ConfigError(f"robot_configs/babyai.py: unknown variant {variant!r}; "
                              "known: default")
  c = qconfig.base_config()
  r = c.robot
  r.name = "babyai"
  r.control_hz = 10.0  # a grid world has no physical rate; used for video playback only
  r.cameras = {"image": {"height": 56, "width": 56}}
  r.state_dim = 0
  r.instruction.source = "step"
  r.action.names = ("action",)
  r.action.dims = {"action": qconfig.discrete_dim(range(len(MINIGRID_ACTIONS)),
                                                  labels=MINIGRID_ACTIONS)}
  r.action.out_of_bounds = "reject"  # an action id outside 0..6 is a data bug
  r.rlds_keys.cameras = {"image": "observation/image"}
  # Sparse success reward in {0, 1}: used as is (QSFT.md).
  c.data.reward_rescale = "auto"
  c.learner.gamma = 0.95
  return c
