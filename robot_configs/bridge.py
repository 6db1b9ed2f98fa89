"""WidowX 250 (BridgeData) on Open X-Embodiment's `bridge` dataset, read as published.

The mapping below says where each of our keys lives in the dataset's RLDS
steps; no conversion. Actions in token order: world_vector (xyz),
rotation_delta (roll, pitch, yaw) with bounds from the dataset's q01 / q99, and
open_gripper (stored as bool: a discrete 0 / 1 token). terminate_episode is not
modelled (the episode end is is_last). State: the 7-dim end-effector state. No
discount in the data (read as 1); the reward is used as is.
The 256x256 camera is resized to 128x128 for the default CPU-sized model. No
simulator here: evaluate offline, or on the robot through qsft_vla.serve.
Usage: --config=robot_configs/bridge.py[:variant] --config.data.dir=<.../bridge/0.1.0>
"""

from qsft_vla import config as qconfig

ARM = ("x", "y", "z", "roll", "pitch", "yaw")


def get_config(variant: str = "qsft"):
  c = qconfig.base_config()
  r = c.robot
  r.name = "widowx_bridge"
  r.control_hz = 5.0
  r.cameras = {"image": {"height": 256, "width": 256}}
  r.state_dim = 7
  r.instruction.source = "step"
  r.action.names = ARM + ("gripper",)
  r.action.dims = {n: qconfig.continuous_dim(None, None, bins=256) for n in ARM}
  r.action.dims["gripper"] = qconfig.discrete_dim((0, 1), labels=("closed", "open"))
  r.action.out_of_bounds = "clip"
  k = r.rlds_keys
  k.cameras = {"image": "observation/image"}
  k.state = "observation/state"
  k.action = "action/world_vector,action/rotation_delta,action/open_gripper"
  k.discount = ""
  k.language_instruction = "observation/natural_language_instruction"

  c.data.image_size = (128, 128)
  c.data.reward_rescale = "auto"
  c.data.window = 2
  c.learner.gamma = 0.98
  c.train.num_steps = 50_000
  c.train.batch_size = 64
  c.eval.env = ""
  qconfig.apply_variant(c, variant, where="robot_configs/bridge.py")
  return c
