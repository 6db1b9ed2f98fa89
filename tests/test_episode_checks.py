"""check_episode: every kind of bad episode fails with the step and key named."""

import numpy as np
import pytest

from qsft_vla.data.episode import DataError, check_episode

from conftest import make_episode


def test_valid_episode_report(metaworld_spec):
  report = check_episode(make_episode(metaworld_spec, 6), metaworld_spec, "ep")
  assert report["length"] == 6
  assert report["out_of_bounds"] == {"dx": 0, "dy": 0, "dz": 0, "gripper": 0}


def _break(ep, fn):
  fn(ep["steps"])
  return ep


@pytest.mark.parametrize("mutate, pattern", [
    (lambda s: s.pop("action"), r"ep, key 'action': missing key"),
    (lambda s: s["observation"].pop("image"), r"key 'observation/image': missing camera"),
    (lambda s: s["observation"].pop("state"), r"key 'observation/state': missing state"),
    (lambda s: s.__setitem__("action", s["action"].astype(np.float64)), r"expected dtype float32"),
    (lambda s: s["action"].__setitem__((3, 2), np.nan), r"ep, step 3, key 'action': non-finite"),
    (lambda s: s["reward"].__setitem__(2, np.inf), r"step 2, key 'reward': non-finite"),
    (lambda s: s["observation"].__setitem__("image", s["observation"]["image"][:, :32]),
     r"key 'observation/image': expected shape \(6, 64, 64, 3\)"),
    (lambda s: s["observation"].__setitem__(
        "image", s["observation"]["image"].astype(np.float32)), r"expected dtype uint8"),
    (lambda s: s["is_first"].__setitem__(2, True), r"step 2, key 'is_first'"),
    (lambda s: s["is_last"].__setitem__(5, False), r"step 5, key 'is_last'"),
    (lambda s: s["is_terminal"].__setitem__(1, True), r"step 1, key 'is_terminal'"),
    (lambda s: s["language_instruction"].__setitem__(4, "  "), r"step 4, key 'language_instruction'"),
    (lambda s: s["language_instruction"].pop(), r"expected 6 instructions"),
])
def test_bad_episodes_are_named(metaworld_spec, mutate, pattern):
  ep = _break(make_episode(metaworld_spec, 6), mutate)
  with pytest.raises(DataError, match=pattern):
    check_episode(ep, metaworld_spec, "ep")


def test_empty_episode(metaworld_spec):
  ep = make_episode(metaworld_spec, 1)
  steps = ep["steps"]
  for k in ("action", "reward", "discount", "is_first", "is_last", "is_terminal"):
    steps[k] = steps[k][:0]
  with pytest.raises(DataError, match="empty episode"):
    check_episode(ep, metaworld_spec, "ep")


def test_out_of_bounds_clip_counts_and_reject_raises(metaworld_spec):
  ep = make_episode(metaworld_spec, 6)
  ep["steps"]["action"][1, 0] = 1.5
  ep["steps"]["action"][4, 0] = -2.0
  ep["steps"]["action"][2, 3] = 1.01
  report = check_episode(ep, metaworld_spec, "ep", out_of_bounds="clip")
  assert report["out_of_bounds"] == {"dx": 2, "dy": 0, "dz": 0, "gripper": 1}
  assert report["first_out_of_bounds"] == (1, "dx")
  with pytest.raises(DataError, match=r"step 1, key 'action': action dimension 'dx' = 1.5"):
    check_episode(ep, metaworld_spec, "ep", out_of_bounds="reject")


def test_discrete_value_off_the_list_always_fails(babyai_spec):
  ep = make_episode(babyai_spec, 4)
  ep["steps"]["action"][2, 0] = 2.5
  with pytest.raises(DataError, match=r"step 2, key 'action'.*not in"):
    check_episode(ep, babyai_spec, "ep", out_of_bounds="clip")
