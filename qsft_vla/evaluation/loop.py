"""Runs a policy closed-loop in a simulator for N episodes: success rate, returns, videos.

  summary, per_episode = evaluate("babyai:BabyAI-GoToLocal-v0", policy, episodes=50, seed=0,
                                  video_dir="/tmp/eval_videos")

Any object with `reset(instruction)` and `act(observation) -> float32[D]` is an
Actor here (the robot Controller, ExpertPolicy, RandomPolicy); the trained
policy itself is qsft_vla.policy.TrainedPolicy. An Actor whose `has_p` is true
(a Q-SFT Controller) is asked `act(observation, return_info=True)` instead, and
its success estimates are recorded and scored (outcomes.summarize).

Episodes. Episode i is reset with `eval_reset_seed(seed, i)`, a function of
(seed, i) only, so every policy evaluated with the same seed sees the same
episodes in the same order (paired comparisons: "Q-SFT vs BC" on identical
initial states). The reset seed is drawn from np.random.SeedSequence([seed, i, 1]);
data_tools.generate draws its training episodes' reset seeds from
SeedSequence([seed, i]).spawn(2)[0], a different stream, so evaluating with the
seed a dataset was generated with does not replay its training episodes.

Actions go to env.step exactly as the policy returned them: the controller is
responsible for the bounds. An action of the wrong shape, NaN/inf, or outside
the robot spec's bounds (continuous: [low, high]; discrete: one of the allowed
values) raises PolicyActionError naming the episode and step; a policy bug is
never silently clipped here.

Videos: with `video_dir`, the first `video_episodes` episodes are written as
GIFs (env.render() frames, nearest-neighbour upscaled to >= 128 px, one frame
after the reset and one after every step, so episode length + 1 frames). A
thin bar under each frame shows the time step (green: the episode succeeded,
red: it failed); it also keeps consecutive frames distinct, which stops the GIF
writer from merging identical frames. Nothing else is written. TF-free.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qsft_vla import envs
from qsft_vla.envs.base import Observation, SimEnv
from qsft_vla.evaluation import outcomes
from qsft_vla.robot import RobotSpec

MIN_VIDEO_SIZE = 128     # px: frames are upscaled (nearest neighbour) to at least this
BAR_HEIGHT = 3           # px: the time-step bar under each video frame
DEFAULT_FPS = 10.0


@runtime_checkable
class Actor(Protocol):
  """What evaluate() drives: reset at each episode start, then one act() per step."""

  def reset(self, instruction: str) -> None:
    ...

  def act(self, observation: Observation) -> np.ndarray:
    ...


class PolicyActionError(ValueError):
  """The policy returned an action the robot cannot execute (a policy bug)."""


def eval_reset_seed(seed: int, index: int) -> int:
  """The reset seed of evaluation episode `index`: a function of (seed, index) only.

  SeedSequence([seed, index, 1]): distinct from data_tools.generate's training
  episodes (SeedSequence([seed, index]).spawn(2)[0]).
  """
  return int(np.random.SeedSequence([int(seed), int(index), 1]).generate_state(1)[0])


# --------------------------------------------------------------------------- #
# Reference policies
# --------------------------------------------------------------------------- #


class _PerEpisodeRng:
  """Episode k (the k-th reset) draws from the rng SeedSequence([seed, k]), so a
  fresh reference policy replays its results exactly."""

  def __init__(self, seed: int):
    self.seed = int(seed)
    self._episodes = 0
    self._rng = np.random.default_rng([self.seed, 0])

  def reset(self, instruction: str) -> None:
    del instruction
    self._rng = np.random.default_rng([self.seed, self._episodes])
    self._episodes += 1


class ExpertPolicy(_PerEpisodeRng):
  """The env's scripted expert (env.expert_action) as an Actor: tests and an upper bound.

  It reads the simulator's state, so it must act in the env being evaluated:
  pass that env here (and the same object to evaluate), or leave env=None and
  evaluate() binds its own env through `bind_env`. Episode k (k-th reset) uses
  the noise rng SeedSequence([seed, k]), so a fresh ExpertPolicy replays exactly.
  """

  def __init__(self, env: SimEnv | None = None, noise: float = 0.0, seed: int = 0):
    if not 0.0 <= noise:
      raise ValueError(f"noise must be >= 0, got {noise}")
    super().__init__(seed)
    self.env = env
    self.noise = float(noise)

  def bind_env(self, env: SimEnv) -> None:
    if self.env is None:
      self.env = env
    elif self.env is not env:
      raise ValueError("ExpertPolicy was made for a different env object than the one being "
                       "evaluated; pass that env to evaluate() or make ExpertPolicy(env=None)")

  def act(self, observation: Observation) -> np.ndarray:
    del observation
    if self.env is None:
      raise RuntimeError("ExpertPolicy has no env: pass one, or run it through evaluate()")
    return self.env.expert_action(self._rng, self.noise)


class RandomPolicy(_PerEpisodeRng):
  """Uniformly random actions within the robot's action space: a lower-bound reference.

  `robot` is a RobotSpec, an env id or a SimEnv (its robot spec is loaded).
  Continuous dimensions are uniform in [low, high]; discrete ones uniform over
  their values. Episode k uses the rng SeedSequence([seed, k]).
  """

  def __init__(self, robot: RobotSpec | SimEnv | str, seed: int = 0):
    spec = _spec_of(robot)
    for d in spec.action_dims:
      if not d.bounded:
        raise ValueError(f"RandomPolicy needs bounded actions; {spec.name} dimension {d.name!r} "
                         "has no low/high (bounds from dataset quantiles)")
    super().__init__(seed)
    self.spec = spec

  def act(self, observation: Observation) -> np.ndarray:
    del observation
    out = []
    for d in self.spec.action_dims:
      if d.kind == "discrete":
        out.append(d.values[int(self._rng.integers(len(d.values)))])
      else:
        out.append(self._rng.uniform(d.low, d.high))
    return np.asarray(out, np.float32)


def _spec_of(robot) -> RobotSpec:
  if isinstance(robot, RobotSpec):
    return robot
  if isinstance(robot, SimEnv):
    return envs.robot_spec_for(robot.env_id)
  if isinstance(robot, str):
    return envs.robot_spec_for(robot)
  raise TypeError(f"expected a RobotSpec, SimEnv or env id, got {type(robot).__name__}")


# --------------------------------------------------------------------------- #
# Action checks
# --------------------------------------------------------------------------- #


def check_action(action, spec: RobotSpec, where: str) -> np.ndarray:
  """The action as float32[D] if it is executable by `spec`'s robot, else PolicyActionError."""
  try:
    a = np.asarray(action)
  except Exception as e:  # pylint: disable=broad-except
    raise PolicyActionError(f"{where}: the policy returned {type(action).__name__}, "
                            f"not an array ({e})") from e
  if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
    raise PolicyActionError(f"{where}: the policy returned a non-numeric action "
                            f"(dtype {a.dtype}): {action!r}")
  if a.shape != (spec.action_dim,):
    raise PolicyActionError(f"{where}: action has shape {a.shape}, the {spec.name} robot needs "
                            f"({spec.action_dim},): {a.tolist()!r}")
  a64 = a.astype(np.float64)
  if not np.isfinite(a64).all():
    raise PolicyActionError(f"{where}: action is not finite (NaN/inf): {a.tolist()!r}")
  for i, d in enumerate(spec.action_dims):
    v = a64[i]
    if d.kind == "discrete":
      if not any(v == float(x) for x in d.values):
        raise PolicyActionError(f"{where}: action dimension {d.name!r} is {v!r}, not one of its "
                                f"allowed values {list(d.values)}")
    elif d.bounded and not d.low <= v <= d.high:
      raise PolicyActionError(f"{where}: action dimension {d.name!r} is {v!r}, outside its "
                              f"bounds [{d.low}, {d.high}] (out-of-bounds actions are not "
                              "clipped here: the policy/controller must keep to the bounds)")
  return a.astype(np.float32)


# --------------------------------------------------------------------------- #
# Videos
# --------------------------------------------------------------------------- #


def _upscale(frame: np.ndarray, min_size: int = MIN_VIDEO_SIZE) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.ndim == 2:
    frame = np.repeat(frame[..., None], 3, axis=-1)
  frame = np.ascontiguousarray(frame[..., :3]).astype(np.uint8)
  k = max(1, math.ceil(min_size / max(1, min(frame.shape[:2]))))
  return frame.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else frame


def _with_bar(frame: np.ndarray, t: int, last: int, success: bool) -> np.ndarray:
  """frame + a bar below it: filled up to t/last, plus a marker toggling with t's parity."""
  h, w = frame.shape[:2]
  bar = np.full((BAR_HEIGHT, w, 3), 40, np.uint8)
  filled = int(round(w * t / max(1, last)))
  bar[:, :filled] = (60, 200, 60) if success else (220, 60, 60)
  bar[:, w - BAR_HEIGHT:] = 255 if t % 2 else 0
  return np.concatenate([frame, bar], axis=0)


def _slug(text: str, limit: int = 60) -> str:
  s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
  return s[:limit].rstrip("_") or "episode"


def _write_gif(path: str, frames: list[np.ndarray], success: bool, fps: float) -> None:
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top  (only when writing videos)
  last = len(frames) - 1
  video = np.stack([_with_bar(_upscale(f), t, last, success) for t, f in enumerate(frames)])
  iio.imwrite(path, video, extension=".gif", duration=1000.0 / fps, loop=0)


def video_name(index: int, instruction: str, success: bool) -> str:
  return f"episode_{index:03d}_{'success' if success else 'failure'}_{_slug(instruction)}.gif"


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def evaluate(env_id: str | SimEnv, policy: Actor, episodes: int, seed: int, *,
             max_steps: int | None = None, video_episodes: int = 3,
             video_dir: str | None = None,
             progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Runs `policy` for `episodes` episodes; returns (summary, per-episode results).

  env_id: an id for envs.make_env (the env is made here and closed at the end),
    or a SimEnv to use as is (not closed; needed when the policy holds the env,
    e.g. ExpertPolicy(env)).
  seed: episode i is reset with eval_reset_seed(seed, i); same seed, same episodes.
  max_steps: a time limit below the env's own (the smaller one applies).
  video_episodes, video_dir: GIFs of episodes 0..video_episodes-1 go to
    video_dir (created if needed); no video_dir, no videos.
  progress: a tqdm bar over episodes (rate, ETA, running success rate).

  Per-episode results: index, reset_seed, instruction, success, return, length,
  terminated, truncated, video (path or None), and the policy's own success
  estimates where it has them (a Q-SFT Controller: has_p): at the first step and
  averaged over the episode (success_estimate_first / _mean, else None). The
  summary is outcomes.summarize(per_episode) plus env_id, seed, max_steps and
  wall_seconds.
  Policy actions that are malformed or out of bounds raise PolicyActionError.
  """
  if isinstance(episodes, bool) or int(episodes) != episodes or episodes < 0:
    raise ValueError(f"episodes must be an integer >= 0, got {episodes!r}")
  if isinstance(seed, bool) or int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
  if max_steps is not None and max_steps < 1:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  if video_episodes < 0:
    raise ValueError(f"video_episodes must be >= 0, got {video_episodes}")
  for name in ("reset", "act"):
    if not callable(getattr(policy, name, None)):
      raise TypeError(f"policy {type(policy).__name__} has no {name}() method")

  own_env = not isinstance(env_id, SimEnv)
  if own_env:
    kwargs = {} if max_steps is None else {"max_steps": int(max_steps)}
    env = envs.make_env(env_id, seed=int(seed), **kwargs)
  else:
    env = env_id
  t0 = time.time()
  try:
    spec = envs.robot_spec_for(env.env_id)
    fps = float(spec.control_hz) if spec.control_hz and spec.control_hz > 0 else DEFAULT_FPS
    if hasattr(policy, "bind_env"):
      policy.bind_env(env)
    if video_dir is not None and video_episodes > 0 and episodes > 0:
      os.makedirs(video_dir, exist_ok=True)

    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=int(episodes), desc=f"eval {env.env_id}", unit="ep", dynamic_ncols=True)

    results = []
    try:
      for i in range(int(episodes)):
        want_video = video_dir is not None and i < video_episodes
        results.append(_run_episode(env, policy, spec, i, int(seed), max_steps, want_video,
                                    video_dir, fps))
        if bar is not None:
          done = sum(r["success"] for r in results)
          bar.set_postfix(success=f"{done}/{len(results)}", refresh=False)
          bar.update(1)
    finally:
      if bar is not None:
        bar.close()
  finally:
    if own_env:
      env.close()

  summary = outcomes.summarize(results)
  summary.update(env_id=env.env_id, seed=int(seed), max_steps=max_steps,
                 wall_seconds=time.time() - t0)
  return summary, results


def _run_episode(env: SimEnv, policy: Actor, spec: RobotSpec, index: int, seed: int,
                 max_steps: int | None, want_video: bool, video_dir: str | None,
                 fps: float) -> dict[str, Any]:
  reset_seed = eval_reset_seed(seed, index)
  obs = env.reset(reset_seed)
  instruction = env.instruction
  policy.reset(instruction)
  values = bool(getattr(policy, "has_p", False))  # a Q-SFT Controller: it can say its Q
  estimates = []
  limit = env.max_steps if max_steps is None else min(env.max_steps, int(max_steps))
  frames = [env.render()] if want_video else None
  total = 0.0
  length = 0
  terminated = truncated = success = False
  while length < limit:
    where = f"episode {index} (reset seed {reset_seed}), step {length}"
    if values:
      action, info = policy.act(obs, return_info=True)
      estimates.append(info["success_estimate"])
    else:
      action = policy.act(obs)
    action = check_action(action, spec, where)
    obs, reward, terminated, truncated, info = env.step(action)
    length += 1
    total += float(reward)
    success = success or bool(info.get("success", False))
    if want_video:
      frames.append(env.render())
    if terminated or truncated:
      break
  if not (terminated or truncated):
    truncated = True  # our own max_steps cut it
  video = None
  if want_video:
    video = os.path.join(video_dir, video_name(index, instruction, success))
    _write_gif(video, frames, success, fps)
  return {"index": index, "reset_seed": reset_seed, "instruction": instruction,
          "success": bool(success), "return": total, "length": length,
          "terminated": bool(terminated), "truncated": bool(truncated), "video": video,
          "success_estimate_first": estimates[0] if estimates else None,
          "success_estimate_mean": float(np.mean(estimates)) if estimates else None}
