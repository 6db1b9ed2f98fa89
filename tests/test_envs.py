"""Simulator adapters: ids, observation/action layout per robot config, sparse rewards, experts."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from qsft_vla import envs
from qsft_vla.data.episode import check_episode
from qsft_vla.envs.rollout import record_episode

BABYAI = "babyai:BabyAI-GoToLocal-v0"
PICK_PLACE = "metaworld:pick-place-v3"


def expert_episode(env, seed, noise=0.0, rng_seed=0):
  rng = np.random.default_rng(rng_seed)
  return record_episode(env, seed, lambda _: env.expert_action(rng, noise), noise=noise)


def check_sparse_reward(ep):
  steps, md = ep["steps"], ep["episode_metadata"]
  reward = steps["reward"]
  assert set(np.unique(reward).tolist()) <= {0.0, 1.0}
  if md["success"]:
    assert reward[-1] == 1.0 and reward[:-1].sum() == 0.0
    assert steps["is_terminal"][-1]
  else:
    assert reward.sum() == 0.0
  assert md["return"] == float(reward.sum())


@pytest.fixture(scope="module")
def babyai_env():
  with envs.make_env(BABYAI, seed=0) as env:
    yield env


@pytest.fixture(scope="module")
def pick_place_env():
  with envs.make_env(PICK_PLACE, seed=0) as env:
    yield env


# --------------------------------------------------------------------------- #
# Registry.


@pytest.mark.parametrize("env_id, needles", [
    ("nope:thing", ["babyai:", "metaworld:", "babyai:BabyAI-GoToLocal-v0"]),
    ("BabyAI-GoToLocal-v0", ["babyai:", "metaworld:"]),
    ("babyai:BabyAI-NoSuchLevel-v0", ["BabyAI-NoSuchLevel-v0", "BabyAI-GoToLocal-v0",
                                      "BabyAI-PickupLoc-v0"]),
    ("metaworld:pick-v3", ["pick-v3", "pick-place-v3", "reach-v3"]),
])
def test_bad_env_id_lists_what_is_known(env_id, needles):
  with pytest.raises(ValueError) as e:
    envs.make_env(env_id, seed=0)
  for needle in needles:
    assert needle in str(e.value)


def test_robot_config_for():
  assert envs.robot_config_for(BABYAI) == "robot_configs.babyai"
  assert envs.robot_config_for("babyai:BabyAI-PutNextLocal-v0") == "robot_configs.babyai"
  assert envs.robot_config_for(PICK_PLACE) == "robot_configs.metaworld"
  with pytest.raises(ValueError, match="known prefix"):
    envs.robot_config_for("gym:CartPole-v1")


# --------------------------------------------------------------------------- #
# BabyAI.


def test_babyai_layout_matches_robot_config(babyai_env, babyai_spec):
  obs = babyai_env.reset(seed=0)
  assert set(obs) == set(babyai_spec.camera_names) == {"image"}
  cam = babyai_spec.cameras[0]
  assert obs["image"].shape == (cam.height, cam.width, 3) == (56, 56, 3)
  assert obs["image"].dtype == np.uint8
  assert babyai_env.action_dim == babyai_spec.action_dim == 1
  assert babyai_env.instruction.startswith("go to")
  a = babyai_env.expert_action(np.random.default_rng(0), 0.0)
  assert a.shape == (1,) and a.dtype == np.float32 and a[0] in babyai_spec.action_dims[0].values
  frame = babyai_env.render()
  assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


def test_babyai_expert_succeeds_with_sparse_reward(babyai_env, babyai_spec):
  for seed in range(5):
    ep = expert_episode(babyai_env, seed)
    assert ep["episode_metadata"]["success"], seed
    check_sparse_reward(ep)
    check_episode(ep, babyai_spec, f"seed {seed}")
    assert ep["steps"]["language_instruction"][0] == babyai_env.instruction


def test_babyai_noisy_expert_recovers(babyai_env, babyai_spec):
  results = []
  for seed in range(10):
    ep = expert_episode(babyai_env, seed, noise=0.5, rng_seed=seed)
    check_sparse_reward(ep)
    check_episode(ep, babyai_spec, f"seed {seed}")
    results.append(ep["episode_metadata"]["success"])
  assert np.mean(results) >= 0.7  # the bot replans around random actions


def test_babyai_truncates_at_max_steps(babyai_spec):
  with envs.make_env(BABYAI, seed=0, max_steps=3) as env:
    assert env.max_steps == 3
    ep = record_episode(env, 0, lambda _: np.array([0.0], np.float32))  # turn left forever
  steps = ep["steps"]
  assert len(steps["action"]) == 3
  assert not steps["is_terminal"].any() and steps["reward"].sum() == 0
  assert not ep["episode_metadata"]["success"]
  check_episode(ep, babyai_spec, "truncated")


def test_babyai_reset_is_deterministic(babyai_env):
  a = babyai_env.reset(seed=7)["image"].copy(), babyai_env.instruction
  babyai_env.reset(seed=8)
  b = babyai_env.reset(seed=7)["image"], babyai_env.instruction
  assert np.array_equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("action", [[7.0], [0.5], [np.nan], [1.0, 2.0]])
def test_babyai_rejects_bad_actions(babyai_env, action):
  babyai_env.reset(seed=0)
  with pytest.raises(ValueError, match="action id"):
    babyai_env.step(np.asarray(action, np.float32))


# --------------------------------------------------------------------------- #
# Meta-World.


def test_metaworld_layout_matches_robot_config(pick_place_env, metaworld_spec):
  env = pick_place_env
  obs = env.reset(seed=0)
  assert set(obs) == set(metaworld_spec.camera_names) | {"state"}
  cam = metaworld_spec.cameras[0]
  assert obs["image"].shape == (cam.height, cam.width, 3) == (64, 64, 3)
  assert obs["image"].dtype == np.uint8 and obs["image"].std() > 10  # a real picture
  assert obs["state"].shape == (metaworld_spec.state_dim,) == (39,)
  assert obs["state"].dtype == np.float32
  assert env.action_dim == metaworld_spec.action_dim == 4
  assert env.instruction == "pick up the puck and place it at the goal"
  # Heavy noise: the recorded action is clipped to the robot's bounds.
  a = env.expert_action(np.random.default_rng(0), 5.0)
  assert a.shape == (4,) and a.dtype == np.float32
  assert np.all(np.abs(a) <= 1.0) and np.any(np.abs(a) == 1.0)
  assert np.array_equal(env.render(), obs["image"])


def test_metaworld_expert_succeeds_with_sparse_reward(pick_place_env, metaworld_spec):
  for seed in range(2):
    ep = expert_episode(pick_place_env, seed)
    assert ep["episode_metadata"]["success"], seed
    assert len(ep["steps"]["action"]) < 100  # ~55 steps
    check_sparse_reward(ep)
    check_episode(ep, metaworld_spec, f"seed {seed}", out_of_bounds="reject")


def test_metaworld_reset_is_deterministic_after_other_episodes(pick_place_env):
  def rollout(env, seed):
    rng = np.random.default_rng(0)
    obs = env.reset(seed=seed)
    images, states = [obs["image"]], [obs["state"]]
    for _ in range(15):
      obs, *_ = env.step(env.expert_action(rng, 0.3))
      images.append(obs["image"])
      states.append(obs["state"])
    return np.stack(images), np.stack(states)

  first = rollout(pick_place_env, 3)
  rollout(pick_place_env, 4)   # a different configuration in between
  again = rollout(pick_place_env, 3)
  assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
  other = rollout(pick_place_env, 5)
  assert not np.array_equal(first[1][0], other[1][0])  # seeds pick other object/goal positions


def test_metaworld_truncates_at_max_steps(metaworld_spec):
  with envs.make_env(PICK_PLACE, seed=0, max_steps=5) as env:
    ep = record_episode(env, 0, lambda _: np.zeros(4, np.float32))
  steps = ep["steps"]
  assert len(steps["action"]) == 5
  assert not steps["is_terminal"].any() and steps["reward"].sum() == 0
  check_episode(ep, metaworld_spec, "truncated")


def test_metaworld_bad_max_steps():
  with pytest.raises(ValueError, match="max_steps"):
    envs.make_env(PICK_PLACE, seed=0, max_steps=501)


def test_metaworld_instructions_and_policies_exist_for_every_task():
  from qsft_vla.envs import metaworld as mw  # pylint: disable=g-import-not-at-top
  for task in mw.tasks():
    assert mw.instruction_for(task) == mw.INSTRUCTIONS[task]
    mw.policy_for(task)
  assert mw.instruction_for("fold-towel-v3") == "do the task: fold towel"


def test_several_envs_in_one_process_and_clean_exit():
  """Each env renders in its own GL context: closing or dropping one leaves the others intact,
  and envs left open (or closed twice) leave no EGL noise at interpreter exit."""
  code = textwrap.dedent("""
      import gc
      import numpy as np
      from qsft_vla import envs
      a = envs.make_env("metaworld:reach-v3", seed=0)
      b = envs.make_env("metaworld:drawer-open-v3", seed=0)
      ia, ib = a.reset(seed=1)["image"], b.reset(seed=1)["image"]
      assert np.array_equal(a.reset(seed=1)["image"], ia)
      a.close(); a.close()
      assert np.array_equal(b.reset(seed=1)["image"], ib), "closing a spoiled b"
      c = envs.make_env("metaworld:reach-v3", seed=0)
      assert np.array_equal(c.reset(seed=1)["image"], ia), "a new env after a close"
      del c; gc.collect()  # dropped without close()
      assert np.array_equal(b.reset(seed=1)["image"], ib), "dropping c spoiled b"
      d = envs.make_env("metaworld:reach-v3", seed=0)  # left open at exit
      print("OK")
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "OK" in proc.stdout
  assert "EGL" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("strict", [False, True])
def test_babyai_strict_ends_a_wrong_pickup_as_a_failure(strict):
  """The distractor picks up the wrong object: with ":strict" that is a terminal failure
  (reward 0), without it the episode goes on; the env id keeps its option."""
  env_id = "babyai:BabyAI-PickupLoc-v0" + (":strict" if strict else "")
  env = envs.make_env(env_id, seed=0)
  rng = np.random.default_rng(0)
  try:
    for seed in range(20):
      env.reset(seed=seed)
      env.start_systematic("distractor", None, rng)
      for _ in range(env.max_steps):
        _, reward, terminated, truncated, info = env.step(env.expert_action(rng, 0.0))
        if terminated or truncated or env.systematic_done():
          break
      if env.systematic_done():   # the wrong object is in the agent's hands
        break
    assert env.systematic_done() and not info["success"] and reward == 0.0
    assert terminated == strict
    assert env.env_id == env_id
  finally:
    env.close()


def test_babyai_strict_needs_a_level_that_has_it():
  with pytest.raises(ValueError, match="no strict mode"):
    envs.make_env("babyai:BabyAI-GoToLocal-v0:strict", seed=0)
  with pytest.raises(ValueError, match="unknown option 'lenient'"):
    envs.parse_env_id("babyai:BabyAI-PickupLoc-v0:lenient")
  with pytest.raises(ValueError, match="takes none"):
    envs.parse_env_id("metaworld:reach-v3:strict")
