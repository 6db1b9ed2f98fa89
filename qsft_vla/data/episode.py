"""The in-memory episode every data tool produces or consumes, and its checks.

An episode is a plain dict of numpy arrays in our canonical RLDS layout
(DESIGN.md, "Data"):

  {"steps": {"observation": {<camera>: uint8[T,H,W,3], ..., "state": float32[T,S]},
             "action": float32[T,D], "reward": float32[T], "discount": float32[T],
             "is_first": bool[T], "is_last": bool[T], "is_terminal": bool[T],
             "language_instruction": list[str] (length T)},
   "episode_metadata": {"episode_id": str, "source": str, "noise": float,
                        "behavior": str, "success": bool, "return": float}}

Step convention: step t holds o_t, the action a_t taken in it and the reward r_t
that followed. The last step's action is a real action (as in Open X-Embodiment
and users' files); `is_terminal` on it says the episode ended in a terminal
state (success), not on a time limit. `noise` is -1 when unknown; `behavior`
is the label of the behaviour that collected the episode (envs.behaviors,
e.g. "noisy@0.5"), "" when unknown (datasets written before it existed lack it).

`check_episode` is the one validator used by the generator, the converter and
`data_tools.validate`; it raises DataError naming where and what. TF-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qsft_vla.errors import DataError, instruction_problem  # noqa: F401 (re-exported)
from qsft_vla.robot import RobotSpec

METADATA_KEYS = ("episode_id", "source", "noise", "behavior", "success", "return")
UNKNOWN_NOISE = -1.0




def step_features(spec: RobotSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
  """A robot's RLDS step, declared once: canonical name -> (shape of one step,
  numpy dtype; np.object_ for text). The writer (rlds_writer.episode_features),
  the validator (data_tools.validate) and the input pipeline
  (pipeline.check_dataset_features) all read it; rlds_reader.canonical_step_keys
  says where a dataset keeps each one."""
  out: dict[str, tuple[tuple[int, ...], Any]] = {
      f"observation/{c.name}": ((c.height, c.width, 3), np.uint8) for c in spec.cameras}
  if spec.state_dim:
    out["observation/state"] = ((spec.state_dim,), np.float32)
  out["action"] = ((spec.action_dim,), np.float32)
  for name in ("reward", "discount"):
    out[name] = ((), np.float32)
  for name in ("is_first", "is_last", "is_terminal"):
    out[name] = ((), np.bool_)
  out["language_instruction"] = ((), np.object_)
  return out


def _first_bad(mask: np.ndarray) -> int:
  """Index of the first step (leading axis) where `mask` is True anywhere."""
  flat = mask.reshape(mask.shape[0], -1).any(axis=1)
  return int(np.argmax(flat))


def check_episode(ep: dict[str, Any], spec: RobotSpec, where: str, *,
                  out_of_bounds: str | None = None) -> dict[str, Any]:
  """Checks an episode against the robot spec; returns a small report.

  Args:
    ep: the episode dict (see module docstring).
    spec: the robot.
    where: names the episode in errors, e.g. "episodes/ep_0003.npz" or "episode 17".
    out_of_bounds: "reject" raises on actions outside declared bounds; "clip"
      only counts them. Defaults to spec.out_of_bounds.

  Returns:
    {"length": T, "out_of_bounds": {dim name: count}, "first_out_of_bounds": (step, dim) or None}
  """
  policy = out_of_bounds or spec.out_of_bounds
  if "steps" not in ep:
    raise DataError(where, "missing 'steps'", key="steps")
  steps = ep["steps"]
  obs = steps.get("observation")
  if not isinstance(obs, dict):
    raise DataError(where, "missing 'observation' dict", key="observation")

  action = _array(steps, "action", where)
  if action.ndim != 2 or action.shape[1] != spec.action_dim:
    raise DataError(where, f"expected shape (T, {spec.action_dim}), got {action.shape}",
                    key="action")
  length = action.shape[0]
  if length == 0:
    raise DataError(where, "empty episode (0 steps)", key="steps")
  _expect_dtype(action, np.float32, where, "action")
  _finite(action, where, "action")

  for cam in spec.cameras:
    key = f"observation/{cam.name}"
    if cam.name not in obs:
      raise DataError(where, f"missing camera {cam.name!r}; present: {sorted(obs)}", key=key)
    img = np.asarray(obs[cam.name])
    want = (length, cam.height, cam.width, 3)
    if img.shape != want:
      raise DataError(where, f"expected shape {want} (T,H,W,3), got {img.shape}", key=key)
    _expect_dtype(img, np.uint8, where, key)
  if spec.state_dim:
    if "state" not in obs:
      raise DataError(where, f"missing state (robot declares state_dim={spec.state_dim})",
                      key="observation/state")
    state = np.asarray(obs["state"])
    if state.shape != (length, spec.state_dim):
      raise DataError(where, f"expected shape ({length}, {spec.state_dim}), got {state.shape}",
                      key="observation/state")
    _expect_dtype(state, np.float32, where, "observation/state")
    _finite(state, where, "observation/state")

  for key in ("reward", "discount"):
    x = _array(steps, key, where)
    if x.shape != (length,):
      raise DataError(where, f"expected shape ({length},), got {x.shape}", key=key)
    _expect_dtype(x, np.float32, where, key)
    _finite(x, where, key)
  flags = {}
  for key in ("is_first", "is_last", "is_terminal"):
    x = _array(steps, key, where)
    if x.shape != (length,):
      raise DataError(where, f"expected shape ({length},), got {x.shape}", key=key)
    _expect_dtype(x, np.bool_, where, key)
    flags[key] = x
  _check_flags(flags, length, where)

  instr = steps.get("language_instruction")
  if instr is None:
    raise DataError(where, "missing language instruction", key="language_instruction")
  if len(instr) != length:
    raise DataError(where, f"expected {length} instructions (one per step), got {len(instr)}",
                    key="language_instruction")
  for t, s in enumerate(instr):
    if isinstance(s, bytes):
      s = s.decode("utf-8")
    if not isinstance(s, str):
      raise DataError(where, f"expected a string, got {type(s).__name__}", step=t,
                      key="language_instruction")
    problem = instruction_problem(s, require_text=spec.instruction_source == "step")
    if problem:
      hint = (" (the robot reads instructions from steps; set "
              "robot.instruction.source='fixed' for a fixed one)" if not s.strip() else "")
      raise DataError(where, f"unusable instruction {s!r}: {problem}{hint}", step=t,
                      key="language_instruction")

  oob_counts, first = _check_bounds(action, spec, where, policy)
  return {"length": length, "out_of_bounds": oob_counts, "first_out_of_bounds": first}


def _array(d, key, where):
  if key not in d:
    raise DataError(where, "missing key", key=key)
  return np.asarray(d[key])


def _expect_dtype(x, dtype, where, key):
  if x.dtype != dtype:
    raise DataError(where, f"expected dtype {np.dtype(dtype).name}, got {x.dtype}", key=key)


def _finite(x, where, key):
  bad = ~np.isfinite(x)
  if bad.any():
    t = _first_bad(bad)
    raise DataError(where, f"non-finite value {x[t].tolist()}", step=t, key=key)


def _check_flags(f, length, where):
  if not f["is_first"][0] or f["is_first"][1:].any():
    t = 0 if not f["is_first"][0] else 1 + int(np.argmax(f["is_first"][1:]))
    raise DataError(where, "is_first must be True exactly at step 0", step=t, key="is_first")
  if not f["is_last"][-1] or f["is_last"][:-1].any():
    t = length - 1 if not f["is_last"][-1] else int(np.argmax(f["is_last"][:-1]))
    raise DataError(where, f"is_last must be True exactly at the last step ({length - 1})",
                    step=t, key="is_last")
  if f["is_terminal"][:-1].any():
    t = int(np.argmax(f["is_terminal"][:-1]))
    raise DataError(where, "is_terminal is only allowed on the last step", step=t,
                    key="is_terminal")


def _check_bounds(action, spec, where, policy):
  counts, first = {}, None
  for j, dim in enumerate(spec.action_dims):
    x = action[:, j]
    if dim.kind == "discrete":
      vals = np.asarray(dim.values)
      bad = np.min(np.abs(x[:, None] - vals[None, :]), axis=1) > 1e-6
      what = f"value not in {list(dim.values)}"
    elif dim.low is not None:
      bad = (x < dim.low) | (x > dim.high)
      what = f"outside [{dim.low}, {dim.high}]"
    else:
      continue  # bounds come from dataset statistics; nothing to check against yet
    n = int(bad.sum())
    counts[dim.name] = n
    if n:
      t = int(np.argmax(bad))
      if first is None:
        first = (t, dim.name)
      # A discrete value off the list is never clippable: it is a data bug.
      if policy == "reject" or dim.kind == "discrete":
        raise DataError(where, f"action dimension {dim.name!r} = {x[t]!r} {what} "
                        f"({n} step(s) in this episode)", step=t, key="action")
  return counts, first
