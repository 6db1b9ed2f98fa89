"""BabyAI (minigrid) as our robot: robot_configs/babyai.py.

Observation {"image": uint8[56,56,3]}: the agent's egocentric 7x7-cell partial
view rendered with 8-pixel tiles. The mission string is the instruction. The
action is float32[1] holding a minigrid action id 0..6.

Reward: exactly 1.0 on the step that completes the mission (minigrid's own
reward, 1 - 0.9 * steps / max_steps, is replaced), 0.0 elsewhere. Terminated:
the mission succeeded, or failed for good (e.g. the wrong object was picked
up: terminal with success False). Truncated: the level's time limit (or a
smaller `max_steps`).

Strict (id "babyai:<level>:strict"): BabyAI's strict verifier, so picking up the
wrong object, opening the wrong door or placing next to the wrong object ends
the episode as a failure (terminal, reward 0) instead of letting the agent try
again: mistakes are costly. Pickup*, Open* and PutNext* levels only.

Expert: minigrid's BabyAIBot with epsilon-random actions (noise = epsilon, the
probability of a uniformly random action). The bot is told the action that was
really taken, so it replans around random actions (it plans to undo them); if
it cannot (it raises on states it does not expect, e.g. after a random action
opened a box), a fresh bot plans from the current state.

Systematic behaviour "distractor" (envs.behaviors): the same bot on the same
kind of mission for another object: the nearest object (Manhattan distance
from the agent's start) that the mission's description does not match; for
Open* another door; for PutNext* the object is put next to another fixed
object. Its mission ends (systematic_done) when the distractor instruction is
verified complete. Single-instruction levels only (GoTo*, Pickup*, Open*,
PutNext*); an episode with no other object is rolled out by the plain bot.
"""

from __future__ import annotations

import contextlib
import io

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI-* levels)
import numpy as np
from minigrid.envs.babyai.core import verifier
from minigrid.utils.baby_ai_bot import BabyAIBot
from minigrid.wrappers import RGBImgPartialObsWrapper

from qsft_vla.envs.base import Observation, SimEnv, StepResult

NUM_ACTIONS = 7           # left, right, forward, pickup, drop, toggle, done
TILE_SIZE = 8             # 7x7 cells * 8 px = 56x56, robot_configs/babyai.py
VIDEO_TILE_SIZE = 16      # render(): the whole grid, larger, for videos


def levels() -> list[str]:
  """The registered BabyAI level names."""
  return sorted(k for k in gym.registry if k.startswith("BabyAI-"))


class BabyAIEnv(SimEnv):
  """One BabyAI level; see the module docstring."""

  robot_config = "robot_configs/babyai.py"
  action_dim = 1
  SYSTEMATIC = {"distractor": False}

  def __init__(self, level: str, seed: int = 0, max_steps: int | None = None):
    super().__init__(f"babyai:{level}", seed)
    level, _, option = level.partition(":")
    self.strict = option == "strict"
    if level not in gym.registry:
      raise ValueError(f"unknown BabyAI level {level!r}; known: {', '.join(levels())}")
    if max_steps is not None and max_steps < 1:
      raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    self.level = level
    self._max_steps_override = max_steps
    self._env = RGBImgPartialObsWrapper(gym.make(level, disable_env_checker=True),
                                        tile_size=TILE_SIZE)
    self._closed = False
    self._bot = None
    self._obs = None
    self._reset(seed)  # so instruction and max_steps are defined before the first reset

  # --- episode ------------------------------------------------------------ #

  def _reset(self, seed: int) -> Observation:
    # Level generation prints "Sampling rejected: ..." on retries; keep CLIs clean.
    with contextlib.redirect_stdout(io.StringIO()):
      obs, _ = self._env.reset(seed=seed)
    if self.strict:
      instrs = self._env.unwrapped.instrs
      if not hasattr(instrs, "strict"):
        raise ValueError(f"babyai:{self.level}:strict: the level's instruction "
                         f"({type(instrs).__name__}) has no strict mode; strict applies to "
                         "Pickup*, Open* and PutNext* levels")
      instrs.strict = True   # read by verify() at every step
    self._mission = obs["mission"]
    self._t = 0
    self._bot = None
    self._steps_since_plan = 0
    self._last_action = None
    self._planned = None
    self._bot_instrs = None    # a distractor mission for the bot; None = the real one
    self._distractor_done = False
    self._probe_instrs = _UNSET  # the probe's distractor, made on first use
    self._obs = self._observation(obs)
    return self._obs

  @property
  def instruction(self) -> str:
    return self._mission

  @property
  def max_steps(self) -> int:
    level_limit = self._env.unwrapped.max_steps
    if self._max_steps_override is None:
      return level_limit
    return min(level_limit, self._max_steps_override)

  def step(self, action: np.ndarray) -> StepResult:
    a = _action_id(action)
    obs, env_reward, terminated, truncated, _ = self._env.step(a)
    self._t += 1
    self._steps_since_plan += 1
    self._last_action = a
    if self._bot_instrs is not None and self._bot_instrs.verify(a) == "success":
      self._distractor_done = True
    # Success is the only terminal state with a positive reward (failures give 0).
    success = bool(terminated and env_reward > 0)
    truncated = not terminated and (truncated or self._t >= self.max_steps)
    self._obs = self._observation(obs)
    return self._obs, float(success), bool(terminated), bool(truncated), {"success": success}

  # --- expert ------------------------------------------------------------- #

  def expert_action(self, rng: np.random.Generator, noise: float) -> np.ndarray:
    # The bot replans every step (also on random steps) so it stays in sync.
    a = self._bot_action()
    if rng.random() < noise:
      a = int(rng.integers(NUM_ACTIONS))
    return np.array([a], np.float32)

  def random_action(self, rng: np.random.Generator) -> np.ndarray:
    return np.array([int(rng.integers(NUM_ACTIONS))], np.float32)

  def start_systematic(self, name, param, rng) -> None:
    if name != "distractor":
      super().start_systematic(name, param, rng)
    self._bot_instrs = _distractor_instr(self._env.unwrapped, self.level)
    self._bot, self._planned, self._distractor_done = None, None, False

  def systematic_done(self) -> bool:
    return self._distractor_done

  def systematic_probe(self, name, param) -> np.ndarray:
    if name != "distractor":
      return super().systematic_probe(name, param)
    if self._probe_instrs is _UNSET:  # its target: nearest to the episode's start
      self._probe_instrs = _distractor_instr(self._env.unwrapped, self.level)
    if self._probe_instrs is None:
      return np.array([self._bot_action()], np.float32)  # no other object: the plain bot
    u = self._env.unwrapped
    saved, u.instrs = u.instrs, self._probe_instrs
    try:
      a = int(BabyAIBot(self._env).replan(None))
    except Exception:  # pylint: disable=broad-except
      a = int(u.actions.done)
    finally:
      u.instrs = saved
    return np.array([a], np.float32)

  def _new_bot(self) -> BabyAIBot:
    """A bot planning for the mission, or for the distractor mission when one is set
    (the bot reads the env's instructions only when it is made)."""
    if self._bot_instrs is None:
      return BabyAIBot(self._env)
    u = self._env.unwrapped
    saved, u.instrs = u.instrs, self._bot_instrs
    try:
      return BabyAIBot(self._env)
    finally:
      u.instrs = saved

  def _bot_action(self) -> int:
    if self._planned is not None and self._steps_since_plan == 0:
      return self._planned  # asked twice for the same state
    try:
      if self._bot is None or self._steps_since_plan > 1:
        # New episode, or steps the bot did not see: plan from the current state.
        self._bot = self._new_bot()
        a = self._bot.replan(None)
      else:
        a = self._bot.replan(self._last_action)
    except Exception:  # pylint: disable=broad-except
      # The bot's plan broke on an off-plan state (it asserts or raises
      # DisappearedBoxError); a fresh bot starts from what it sees now.
      try:
        self._bot = self._new_bot()
        a = self._bot.replan(None)
      except Exception:  # pylint: disable=broad-except
        self._bot, a = None, int(self._env.unwrapped.actions.done)
    self._planned, self._steps_since_plan = int(a), 0
    return self._planned

  # --- frames ------------------------------------------------------------- #

  @staticmethod
  def _observation(obs) -> Observation:
    return {"image": np.ascontiguousarray(obs["image"], dtype=np.uint8)}

  def render(self) -> np.ndarray:
    """The whole grid from above (agent's view highlighted), for videos."""
    return self._env.unwrapped.get_frame(highlight=True, tile_size=VIDEO_TILE_SIZE)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._env.close()


_NOT_OBJECTS = ("wall", "floor", "goal", "lava")
_UNSET = object()


def _distractor_instr(u, level: str):
  """The mission's instruction retargeted to the nearest object it does not
  describe, verifier reset on `u` (the unwrapped env); None when no such object."""
  instrs = u.instrs
  if isinstance(instrs, verifier.PutNextInstr):
    target, make = instrs.desc_fixed, lambda d: verifier.PutNextInstr(instrs.desc_move, d)
    exclude = list(instrs.desc_move.obj_set)
  elif isinstance(instrs, (verifier.GoToInstr, verifier.PickupInstr, verifier.OpenInstr)):
    target, make, exclude = instrs.desc, lambda d: type(instrs)(d), []
  else:
    raise ValueError(f"distractor behaviour: {level} has a {type(instrs).__name__} mission; "
                     "only single GoTo/Pickup/Open/PutNext missions can be retargeted")
  taken = {(o.type, o.color) for o in target.obj_set}
  want_door = target.type == "door"
  agent = np.asarray(u.agent_pos)
  best, best_d = None, None
  for i, obj in enumerate(u.grid.grid):
    if obj is None or obj.type in _NOT_OBJECTS or (obj.type == "door") != want_door:
      continue
    if (obj.type, obj.color) in taken or any(obj is e for e in exclude):
      continue
    pos = np.array([i % u.grid.width, i // u.grid.width])
    d = int(np.abs(pos - agent).sum())
    if best_d is None or d < best_d:
      best, best_d = obj, d
  if best is None:
    return None
  instr = make(verifier.ObjDesc(best.type, best.color))
  instr.reset_verifier(u)
  return instr


def _action_id(action) -> int:
  """float32[1] holding 0..6 -> int; anything else is a caller bug."""
  a = np.asarray(action, dtype=np.float64).reshape(-1)
  if a.shape != (1,) or not np.isfinite(a[0]) or a[0] != round(a[0]) \
      or not 0 <= a[0] < NUM_ACTIONS:
    raise ValueError(f"BabyAI action must be float32[1] holding an action id 0..{NUM_ACTIONS - 1}, "
                     f"got {np.asarray(action).tolist()!r}")
  return int(a[0])
