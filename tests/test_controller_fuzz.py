"""Fuzz: 10,000 random and hostile observations per robot; the Controller either
refuses one (ObservationError; ControllerError when a finite but absurd input
overflows the network) or returns an in-bounds, finite action."""

import numpy as np
import pytest

from checkpoint_fixture import write_checkpoint
from qsft_vla.policy.controller import Controller, ControllerError, ObservationError

CASES = 10_000


def _hostile(rng, valid, spec):
  """One mutation of a valid observation (about a tenth stay valid)."""
  obs = {k: v.copy() for k, v in valid.items()}
  key = rng.choice(sorted(obs))
  kind = rng.integers(16)
  junk = [None, "image", 3, 2.5, [1, 2, 3], {"a": 1}, b"\x00" * 8, object(), np.str_("x")]
  if kind == 0:
    pass
  elif kind == 1:
    del obs[key]
  elif kind == 2:
    obs[f"extra_{rng.integers(3)}"] = obs[key]
  elif kind == 3:
    obs[key] = junk[rng.integers(len(junk))]
  elif kind == 4:  # another dtype
    dtype = [np.float32, np.float64, np.int64, np.int8, np.bool_, np.float16, np.complex64,
             np.uint16][rng.integers(8)]
    obs[key] = obs[key].astype(dtype)
  elif kind == 5:  # another shape
    shape = list(obs[key].shape)
    i = rng.integers(len(shape))
    shape[i] = int(rng.integers(0, 3 * shape[i] + 2))
    obs[key] = np.resize(obs[key], shape)
  elif kind == 6:  # extra or missing axes
    obs[key] = obs[key][None] if rng.integers(2) else obs[key].reshape(-1)
  elif kind == 7:  # 0-d
    obs[key] = np.asarray(obs[key]).reshape(-1)[:1].reshape(())
  elif kind == 8 and "state" in obs:  # non-finite state entries
    obs["state"][rng.integers(spec.state_dim)] = [np.nan, np.inf, -np.inf][rng.integers(3)]
  elif kind == 9 and "state" in obs:  # huge or tiny state values
    obs["state"] = (obs["state"] * 10.0 ** rng.integers(-40, 39)).astype(np.float32)
  elif kind == 10 and "state" in obs:  # float64 with values beyond float32
    obs["state"] = obs["state"].astype(np.float64) * 1e300
  elif kind == 11:  # float image, possibly NaN or huge
    with np.errstate(over="ignore"):
      img = obs[key].astype(np.float32) * float(10.0 ** rng.integers(-3, 40))
    if rng.integers(2):
      img.reshape(-1)[rng.integers(img.size)] = np.nan
    obs[key] = img
  elif kind == 12:  # a non-contiguous or read-only view of valid data (must work)
    obs[key] = np.asfortranarray(obs[key])
    obs[key].setflags(write=False)
  elif kind == 13:  # not a dict at all
    return [obs, list(obs.values()), None, "obs", 7][rng.integers(5)]
  elif kind == 14:  # extreme valid uint8 images
    obs = {k: (np.full_like(v, 255 * rng.integers(2)) if v.dtype == np.uint8 else v)
           for k, v in obs.items()}
  else:  # a key of another type
    obs[(1, 2)] = obs.pop(key)
  return obs


@pytest.mark.parametrize("robot", ["babyai", "metaworld"])
def test_hostile_observations_never_yield_a_bad_action(tmp_path, robot):
  ctrl = Controller.load(write_checkpoint(tmp_path, robot, "qsft", "shared"), warmup=False)
  spec = ctrl.spec
  rng = np.random.default_rng(0)
  valid = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
           for c in spec.cameras}
  if spec.state_dim:
    valid["state"] = rng.normal(size=spec.state_dim).astype(np.float32)
  ctrl.reset("go to the red ball")
  outcomes = {"acted": 0, "refused": 0, "overflow": 0}
  for i in range(CASES):
    if i % 500 == 0:
      ctrl.reset("go to the red ball")  # keep the history window short and fresh
    obs = _hostile(rng, valid, spec)
    try:
      action = ctrl.act(obs)
    except ObservationError:
      outcomes["refused"] += 1
      continue
    except ControllerError as e:
      assert "not finite" in str(e), (i, str(e))
      outcomes["overflow"] += 1
      continue
    outcomes["acted"] += 1
    action = np.asarray(action, np.float64)
    assert action.shape == (len(spec.action_dims),) and np.isfinite(action).all(), (i, action)
    for d, a in zip(spec.action_dims, action):
      if d.kind == "discrete":
        assert a in d.values, (i, a)
      else:
        assert d.low <= a <= d.high, (i, d.name, a)
  # Both outcomes happen: the fuzz reaches the model, and the checks refuse.
  assert outcomes["acted"] > CASES // 20 and outcomes["refused"] > CASES // 2, outcomes


def test_an_overflowing_observation_is_refused_and_forgotten(tmp_path):
  ctrl = Controller.load(write_checkpoint(tmp_path, "metaworld", "qsft", "shared"),
                         warmup=False)
  rng = np.random.default_rng(1)
  obs = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
         for c in ctrl.spec.cameras}
  obs["state"] = np.full(ctrl.spec.state_dim, 3e38, np.float32)   # finite, absurd
  ctrl.reset("reach the goal")
  with pytest.raises(ControllerError, match="not finite"):
    ctrl.act(obs)
  obs["state"] = np.zeros(ctrl.spec.state_dim, np.float32)
  first = ctrl.act(obs)          # the refused frame is not in the history: a fresh start
  ctrl.reset("reach the goal")
  np.testing.assert_array_equal(ctrl.act(obs), first)
