"""Runs one episode in a SimEnv and records it as our canonical episode dict.

The recorded layout is qsft_vla.data.episode's: step t holds o_t, the action
a_t taken in it and the reward r_t that followed; the observation after the
last action is not stored. The last step is terminal when the episode ended in
a terminal state (success, or an unrecoverable failure) and not when the time
limit cut it. Discounts are all 1: episode ends are carried by is_terminal
(QSFT.md), as in Open X-Embodiment. TF-free.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from qsft_vla.data.episode import UNKNOWN_NOISE
from qsft_vla.envs.base import Observation, SimEnv


def record_episode(env: SimEnv, seed: int, act: Callable[[Observation], np.ndarray], *,
                   episode_id: str = "", noise: float = UNKNOWN_NOISE, behavior: str = "",
                   start: Callable[[], None] | None = None,
                   stop: Callable[[], bool] | None = None) -> dict[str, Any]:
  """Resets `env` with `seed` and steps it with `act(obs)` until the episode ends.

  `start()` runs right after the reset; `stop()` after every step that did not
  end the episode: True ends it there, truncated (a behaviour that finished its
  own goal). `behavior` is recorded in the metadata.
  """
  obs = env.reset(seed)
  if start is not None:
    start()
  instruction = env.instruction
  frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
  actions, rewards = [], []
  terminated = success = False
  for _ in range(env.max_steps):
    action = np.asarray(act(obs), np.float32).reshape(env.action_dim)
    for k, v in obs.items():
      frames[k].append(v)
    actions.append(action)
    obs, reward, terminated, truncated, info = env.step(action)
    rewards.append(reward)
    success = bool(info.get("success", False))
    if terminated or truncated or (stop is not None and stop()):
      break
  length = len(actions)
  t = np.arange(length)
  steps = {
      "observation": {k: np.stack(v) for k, v in frames.items()},
      "action": np.stack(actions).astype(np.float32),
      "reward": np.asarray(rewards, np.float32),
      "discount": np.ones(length, np.float32),
      "is_first": t == 0,
      "is_last": t == length - 1,
      "is_terminal": (t == length - 1) & bool(terminated),
      "language_instruction": [instruction] * length,
  }
  metadata = {"episode_id": episode_id, "source": env.env_id, "noise": float(noise),
              "behavior": behavior, "success": success, "return": float(np.sum(steps["reward"]))}
  return {"steps": steps, "episode_metadata": metadata}
