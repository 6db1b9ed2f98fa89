"""The RT-1 robot (Google's mobile manipulator) on Open X-Embodiment's fractal20220817_data.

Reads the dataset as published (RLDS / TFDS, `tfds.builder_from_directory` on
its folder), with no conversion: the mapping below says where each of our keys
lives in its steps. Actions are RT-1's arm action in token order: world_vector
(xyz), rotation_delta (roll, pitch, yaw), gripper_closedness_action, and
terminate_episode, a one-hot vector stored as int32[3] and read as its index
(one discrete token). Continuous bounds come from the dataset's q01 / q99
(data_tools.stats computes them). The dataset stores no discount (read as 1);
its reward is the sparse success flag, used as is. The base's actions
(base_displacement_*) are not modelled: the fractal data is tabletop
manipulation with a parked base.
The 256x320 camera is resized to 128x160 for the default CPU-sized model.
There is no simulator for it here: evaluate offline, or on the robot through
qsft_vla.serve.
Usage: --config=robot_configs/fractal.py[:variant] --config.data.dir=<.../fractal20220817_data/0.1.0>
"""

from qsft_vla import config as qconfig

ARM = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


def get_config(variant: str = "qsft"):
  c = qconfig.base_config()
  r = c.robot
  r.name = "rt1_google_robot"
  r.control_hz = 3.0
  r.cameras = {"image": {"height": 256, "width": 320}}
  r.state_dim = 0
  r.instruction.source = "step"
  r.action.names = ARM + ("terminate",)
  r.action.dims = {n: qconfig.continuous_dim(None, None, bins=256) for n in ARM}
  r.action.dims["terminate"] = qconfig.discrete_dim(
      (0, 1, 2), labels=("terminate", "continue", "unused"))
  r.action.out_of_bounds = "clip"
  k = r.rlds_keys
  k.cameras = {"image": "observation/image"}
  k.action = ("action/world_vector,action/rotation_delta,action/gripper_closedness_action,"
              "action/terminate_episode:argmax")
  k.discount = ""
  k.language_instruction = "observation/natural_language_instruction"

  c.data.image_size = (128, 160)
  c.data.reward_rescale = "auto"
  c.data.window = 2
  c.learner.gamma = 0.98
  c.train.num_steps = 50_000
  c.train.batch_size = 64
  c.eval.env = ""
  qconfig.apply_variant(c, variant, where="robot_configs/fractal.py")
  return c
