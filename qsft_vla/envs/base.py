"""The interface every simulator adapter implements.

Data generation (scripted expert + noise) and closed-loop evaluation (a policy
through the controller) drive simulators through this one interface, so they
see the same observations, actions, rewards and episode ends:

  env = make_env("babyai:BabyAI-GoToLocal-v0", seed=0)
  obs = env.reset(seed=3)            # {"image": uint8[H,W,3], ("state": float32[S])}
  text = env.instruction             # the language instruction of this episode
  obs, reward, terminated, truncated, info = env.step(action)   # action: float32[D]
  action = env.expert_action(rng, noise)                        # noisy scripted expert
  action = env.random_action(rng)                               # uniformly random
  env.start_systematic("distractor", None, rng)  # after reset: expert_action errs systematically
  env.close()

Rewards are sparse: 1.0 on the step that succeeds, 0.0 elsewhere. `terminated`
means a real terminal state (success, or a failure the task cannot recover
from); `truncated` means the time limit `max_steps` cut the episode. Never both.
Observation keys are the robot config's camera names, plus "state" when the
robot has a state vector; actions are the robot config's action space.
TF-free: the robot host and evaluation import this.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

Observation = dict[str, np.ndarray]
StepResult = tuple[Observation, float, bool, bool, dict[str, Any]]


class SimEnv(abc.ABC):
  """A simulator seen as our robot: camera images (+ state), float32 actions."""

  # Set by subclasses.
  robot_config: str = ""           # e.g. "robot_configs/babyai.py"
  action_dim: int = 0
  # Systematic behaviours (envs.behaviors): name -> whether it takes a parameter.
  SYSTEMATIC: dict[str, bool] = {}

  def __init__(self, env_id: str, seed: int):
    self.env_id = env_id
    # Seeds the resets that are called without one (reset() with no argument).
    self._seeds = np.random.SeedSequence(seed)

  @abc.abstractmethod
  def _reset(self, seed: int) -> Observation:
    """Starts the episode determined by `seed`."""

  def reset(self, seed: int | None = None) -> Observation:
    """Starts a new episode; the same seed gives the same episode."""
    if seed is None:
      seed = int(self._seeds.spawn(1)[0].generate_state(1)[0])
    return self._reset(int(seed))

  @property
  @abc.abstractmethod
  def instruction(self) -> str:
    """The language instruction of the current episode."""

  @property
  @abc.abstractmethod
  def max_steps(self) -> int:
    """The time limit: the episode is truncated after this many steps."""

  @abc.abstractmethod
  def step(self, action: np.ndarray) -> StepResult:
    """Executes float32[action_dim]; returns (obs, reward, terminated, truncated, info).

    info["success"] says whether this step completed the task.
    """

  @abc.abstractmethod
  def expert_action(self, rng: np.random.Generator, noise: float) -> np.ndarray:
    """The scripted expert's action for the current state, perturbed by `noise`.

    Returns float32[action_dim] inside the robot's action bounds: exactly what
    `step` should be given and what a dataset records.
    """

  @abc.abstractmethod
  def random_action(self, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random action inside the robot's bounds (float32[action_dim])."""

  def start_systematic(self, name: str, param: float | None, rng: np.random.Generator) -> None:
    """Until the next reset, `expert_action` carries out systematic behaviour `name`
    (one of SYSTEMATIC): consistent mistakes, e.g. the expert aimed at the wrong goal."""
    del param, rng
    raise ValueError(f"{self.env_id} has no systematic behaviour {name!r}; known: "
                     f"{', '.join(sorted(self.SYSTEMATIC)) or 'none'}")

  def systematic_probe(self, name: str, param: float | None) -> np.ndarray:
    """What systematic behaviour `name` would do in the current state (as if it had
    started this episode), without changing what the env or its expert does."""
    del param
    raise ValueError(f"{self.env_id} has no systematic behaviour {name!r}; known: "
                     f"{', '.join(sorted(self.SYSTEMATIC)) or 'none'}")

  def systematic_done(self) -> bool:
    """The systematic behaviour has finished its own (wrong) goal: end the episode."""
    return False

  @abc.abstractmethod
  def render(self) -> np.ndarray:
    """An RGB frame of the current state for videos (uint8[H,W,3])."""

  @abc.abstractmethod
  def close(self) -> None:
    """Frees the simulator (rendering contexts); safe to call twice."""

  def __enter__(self) -> "SimEnv":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False
