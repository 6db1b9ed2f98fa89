"""Meta-World v3 (Sawyer arm, MuJoCo) as our robot: robot_configs/metaworld.py.

Observation {"image": uint8[64,64,3], "state": float32[39]}: one fixed camera
("corner4": arm, gripper, object and goal all visible at 64x64) and the MT1
39-dim state (hand, gripper, object poses, previous frame, goal). The action is
float32[4] in [-1, 1]: xyz end-effector deltas and the gripper.

Task: the MT1 benchmark's 50 configurations (object and goal positions) of one
task, made with a fixed seed so every process sees the same 50. reset(seed)
picks one of them from `seed` (or always `task_index` when given), so the same
seed gives the same episode.

Reward: 1.0 on the step where info["success"] first holds, which terminates the
episode; 0.0 elsewhere. Truncated at `max_steps` (default 200; Meta-World's own
limit is 500: the noiseless expert needs ~50 steps on pick-place).

Expert: the task's scripted policy (metaworld.policies) plus Gaussian noise of
std `noise` per dimension, clipped to [-1, 1] so the dataset holds exactly what
was executed.

Systematic behaviour "biased@CM" (envs.behaviors): the scripted policy sees
the object and goal positions displaced by CM centimetres along BIAS_DIRECTION
(one fixed horizontal direction, so it misses the same way every time). Its
goal is finished (systematic_done) once the hand has stayed within 2 mm of
where it was for 10 steps: it hovers at the wrong place instead of idling to
the time limit.

Rendering: multisampling, shadows and reflections are off (about 20x faster
with software EGL: ~7 -> ~150 frames/s at 64x64; no visible loss at that size).
The corner cameras are mounted upside down (their image "up" points down in the
world), so their frames are rotated by 180 degrees; a vertical flip alone would
mirror the scene.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless; before mujoco is imported

import atexit  # pylint: disable=g-import-not-at-top
import warnings  # pylint: disable=g-import-not-at-top
import weakref  # pylint: disable=g-import-not-at-top

import gymnasium as gym  # pylint: disable=g-import-not-at-top
import metaworld  # noqa: F401  pylint: disable=g-import-not-at-top  (registers Meta-World/MT1)
import metaworld.policies  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # pylint: disable=g-import-not-at-top

from qsft_vla.envs.base import Observation, SimEnv, StepResult  # pylint: disable=g-import-not-at-top

CAMERA = "corner4"
IMAGE_SIZE = 64
STATE_DIM = 39
DEFAULT_MAX_STEPS = 200
ENV_MAX_STEPS = 500       # Meta-World's max_path_length: stepping past it raises
TASK_SET_SEED = 0         # fixes MT1's 50 sampled configurations
NUM_TASK_CONFIGS = 50
# biased@CM: the positions the scripted policy sees move along this direction.
BIAS_DIRECTION = np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
# State layout (MT1): hand xyz, gripper, object 1 xyz + quat, object 2 xyz + quat,
# the same 18 of the previous frame, goal xyz.
_POSITION_SLICES = (slice(4, 7), slice(11, 14), slice(22, 25), slice(29, 32), slice(36, 39))
_HOVER_MM, _HOVER_STEPS = 2.0, 10

# The scripted policies warn on every new process that their gains saturate the
# action box; that is expected (the env clips, and so do we).
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")

# Instructions (wording after the Meta-World paper's task descriptions).
INSTRUCTIONS = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and dunk it into the basket",
    "bin-picking-v3": "pick up the puck and place it into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet handle to close it",
    "faucet-open-v3": "turn the faucet handle to open it",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "hand-insert-v3": "insert the gripper into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "pick-out-of-hole-v3": "pick the peg up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "pull the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position over the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "stick-push-v3": "grasp the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "slide the window closed",
    "window-open-v3": "slide the window open",
}

# Policy classes whose name is not Sawyer<CamelCaseTask>Policy.
_POLICY_NAMES = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}


def tasks() -> list[str]:
  """The Meta-World v3 task names."""
  return sorted(ALL_V3_ENVIRONMENTS)


def instruction_for(task: str) -> str:
  """The templated instruction; unknown tasks get one made from the task name."""
  if task in INSTRUCTIONS:
    return INSTRUCTIONS[task]
  words = task[:-3] if task.endswith("-v3") else task
  return f"do the task: {words.replace('-', ' ')}"


def policy_for(task: str):
  """The task's scripted policy (metaworld.policies.Sawyer<Task>V3Policy)."""
  name = _POLICY_NAMES.get(task) or (
      "Sawyer" + "".join(p.capitalize() for p in task.split("-")) + "Policy")
  cls = getattr(metaworld.policies, name, None)
  if cls is None:
    raise ValueError(f"Meta-World task {task!r} has no scripted policy {name}")
  return cls()


class MetaWorldEnv(SimEnv):
  """One Meta-World v3 task; see the module docstring."""

  robot_config = "robot_configs/metaworld.py"
  action_dim = 4
  SYSTEMATIC = {"biased": True}

  def __init__(self, task: str, seed: int = 0, max_steps: int | None = None,
               camera: str = CAMERA, task_index: int | None = None):
    super().__init__(f"metaworld:{task}", seed)
    if task not in ALL_V3_ENVIRONMENTS:
      raise ValueError(f"unknown Meta-World task {task!r}; known: {', '.join(tasks())}")
    max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
    if not 1 <= max_steps <= ENV_MAX_STEPS:
      raise ValueError(f"max_steps must be in [1, {ENV_MAX_STEPS}], got {max_steps}")
    if task_index is not None and not 0 <= task_index < NUM_TASK_CONFIGS:
      raise ValueError(f"task_index must be in [0, {NUM_TASK_CONFIGS}), got {task_index}")
    self.task = task
    self.camera = camera
    self.task_index = task_index
    self._max_steps = max_steps
    self._policy = policy_for(task)
    self._closed = True  # until there is something to close
    self._env = gym.make("Meta-World/MT1", env_name=task, seed=TASK_SET_SEED,
                         render_mode="rgb_array", width=IMAGE_SIZE, height=IMAGE_SIZE,
                         camera_name=camera, disable_env_checker=True)
    self._closed = False
    model = self._env.unwrapped.model
    model.vis.quality.offsamples = 0   # read when the render context is made
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0
    self._configs = _task_configs(self._env)
    self._raw_obs = None
    self._image = None
    self._t = 0
    self._succeeded = False
    self._rotate = _upside_down(self._env.unwrapped, camera)
    self._reset(seed)  # creates the rendering context (see _close_at_exit)
    _close_at_exit(self)

  # --- episode ------------------------------------------------------------ #

  def _reset(self, seed: int) -> Observation:
    index = self.task_index
    if index is None:
      index = int(np.random.default_rng(seed).integers(len(self._configs)))
    self._env.unwrapped.set_task(self._configs[index])
    raw, _ = self._env.reset(seed=seed)
    self._t = 0
    self._succeeded = False
    self._bias = None          # biased@CM: offset added to the positions the policy sees
    self._still_steps = 0
    return self._observation(raw)

  @property
  def instruction(self) -> str:
    return instruction_for(self.task)

  @property
  def max_steps(self) -> int:
    return self._max_steps

  def step(self, action: np.ndarray) -> StepResult:
    a = np.asarray(action, np.float32).reshape(-1)
    if a.shape != (4,) or not np.isfinite(a).all():
      raise ValueError(f"Meta-World action must be 4 finite floats, got {a.tolist()!r}")
    hand_before = self._raw_obs[:3].copy()
    raw, _, _, truncated, info = self._env.step(np.clip(a, -1.0, 1.0))
    self._t += 1
    moved_mm = 1000.0 * float(np.linalg.norm(np.asarray(raw[:3]) - hand_before))
    self._still_steps = self._still_steps + 1 if moved_mm < _HOVER_MM else 0
    success = bool(info.get("success", 0.0)) and not self._succeeded
    self._succeeded |= success
    truncated = not success and (truncated or self._t >= self._max_steps)
    return self._observation(raw), float(success), success, bool(truncated), {"success": success}

  # --- expert ------------------------------------------------------------- #

  def expert_action(self, rng: np.random.Generator, noise: float) -> np.ndarray:
    seen = self._raw_obs
    if self._bias is not None:
      seen = np.array(seen, np.float64)
      for s in _POSITION_SLICES:
        seen[s] += self._bias
    a = np.asarray(self._policy.get_action(seen), np.float64)
    a = a + noise * rng.standard_normal(a.shape)
    return np.clip(a, -1.0, 1.0).astype(np.float32)

  def random_action(self, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=4).astype(np.float32)

  def start_systematic(self, name, param, rng) -> None:
    if name != "biased":
      super().start_systematic(name, param, rng)
    self._bias = BIAS_DIRECTION * (float(param) / 100.0)
    self._still_steps = 0

  def systematic_probe(self, name, param) -> np.ndarray:
    if name != "biased":
      return super().systematic_probe(name, param)
    saved, self._bias = self._bias, BIAS_DIRECTION * (float(param) / 100.0)
    try:
      return self.expert_action(np.random.default_rng(0), 0.0)
    finally:
      self._bias = saved

  def systematic_done(self) -> bool:
    return self._bias is not None and self._still_steps >= _HOVER_STEPS

  # --- frames ------------------------------------------------------------- #

  def _observation(self, raw: np.ndarray) -> Observation:
    self._raw_obs = raw
    image = self._render()
    self._image = np.ascontiguousarray(image[::-1, ::-1] if self._rotate else image)
    return {"image": self._image, "state": np.asarray(raw, np.float32)}

  def render(self) -> np.ndarray:
    """The current camera image (64x64); a second, larger context would cost as much again."""
    return self._image.copy()

  def _render(self) -> np.ndarray:
    global _CURRENT
    # gymnasium makes a GL context current only when it creates it; with several
    # envs in one process each must render in its own context.
    viewer = self._env.unwrapped.mujoco_renderer.viewer
    if viewer is not None and (_CURRENT is None or _CURRENT() is not self):
      viewer.make_context_current()
    image = self._env.render()
    _CURRENT = weakref.ref(self)
    return image

  def close(self) -> None:
    global _CURRENT
    if self._closed:
      return
    self._closed = True
    _OPEN_ENVS.discard(self)
    viewer = self._env.unwrapped.mujoco_renderer.viewer
    if viewer is not None:
      # gymnasium frees the GL context but leaves the MjrContext to garbage
      # collection, which frees its GL objects in whatever context is current
      # then (another env's, which then renders black): free it now, in its own.
      viewer.make_context_current()
      viewer.con.free()
    self._env.close()
    _CURRENT = None

  def __del__(self):
    # Dropped without close(): free the contexts now, in the right order (above).
    if not getattr(self, "_closed", True):
      self.close()


_OPEN_ENVS: "weakref.WeakSet[MetaWorldEnv]" = weakref.WeakSet()
_CURRENT: "weakref.ref[MetaWorldEnv] | None" = None  # whose GL context is current
_EXIT_HOOK_REGISTERED = False


def _close_at_exit(env: MetaWorldEnv) -> None:
  """Closes envs still open at interpreter exit, before EGL is shut down.

  mujoco.egl registers eglTerminate with atexit when the first context is
  made; a context freed after that (by garbage collection at exit) raises noisy
  EGLErrors. atexit runs last-registered first, so registering this hook after
  the first context exists makes it run before eglTerminate.
  """
  global _EXIT_HOOK_REGISTERED
  _OPEN_ENVS.add(env)
  if not _EXIT_HOOK_REGISTERED:
    _EXIT_HOOK_REGISTERED = True
    atexit.register(lambda: [e.close() for e in list(_OPEN_ENVS)])


def _upside_down(sim, camera: str) -> bool:
  """Whether the camera's image "up" axis points down in the world."""
  cam = sim.model.camera(camera).id
  return bool(sim.data.cam_xmat[cam].reshape(3, 3)[2, 1] < 0)


def _task_configs(env) -> list:
  """MT1's list of Task configurations, found on its task-selection wrapper."""
  e = env
  while e is not None:
    if hasattr(e, "tasks") and hasattr(e, "toggle_sample_tasks_on_reset"):
      e.toggle_sample_tasks_on_reset(False)  # we choose the task from the reset seed
      return list(e.tasks)
    e = getattr(e, "env", None)
  raise RuntimeError("Meta-World/MT1 env has no task-selection wrapper; metaworld changed?")
