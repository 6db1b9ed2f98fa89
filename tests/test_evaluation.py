"""qsft_vla.evaluation: Wilson interval, summary/table, the closed-loop evaluate()."""

import math
import os

import numpy as np
import pytest

from conftest import run_without_tensorflow
from qsft_vla.evaluation import loop, outcomes

BABYAI = "babyai:BabyAI-GoToLocal-v0"


# --- stats ------------------------------------------------------------------ #


def test_wilson_known_answers():
  low, high = outcomes.wilson_interval(8, 10)
  assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
  low, high = outcomes.wilson_interval(0, 10)
  assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
  low, high = outcomes.wilson_interval(10, 10)
  assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-3)
  low, high = outcomes.wilson_interval(50, 100)
  assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
  assert outcomes.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_properties():
  for n in (1, 7, 30, 200):
    for k in range(n + 1):
      low, high = outcomes.wilson_interval(k, n)
      assert 0.0 <= low <= k / n <= high <= 1.0
      # Mirror symmetry: k successes vs k failures.
      l2, h2 = outcomes.wilson_interval(n - k, n)
      assert low == pytest.approx(1 - h2, abs=1e-12) and high == pytest.approx(1 - l2, abs=1e-12)
  # More episodes, narrower interval; larger z, wider.
  w = lambda k, n, z=1.96: np.subtract(*outcomes.wilson_interval(k, n, z)[::-1])
  assert w(80, 100) < w(8, 10)
  assert w(8, 10, z=2.58) > w(8, 10)
  with pytest.raises(ValueError):
    outcomes.wilson_interval(11, 10)
  with pytest.raises(ValueError):
    outcomes.wilson_interval(-1, 10)


def test_summarize():
  results = [{"success": True, "return": 1.0, "length": 4},
             {"success": False, "return": 0.0, "length": 10},
             {"success": True, "return": 1.0, "length": 6},
             {"success": True, "return": 1.0, "length": 8}]
  s = outcomes.summarize(results)
  assert s["episodes"] == 4 and s["successes"] == 3
  assert s["success_rate"] == 0.75
  assert (s["ci_low"], s["ci_high"]) == outcomes.wilson_interval(3, 4)
  assert s["mean_return"] == 0.75 and s["std_return"] == pytest.approx(np.std([1, 0, 1, 1]))
  assert s["mean_length"] == 7.0 and s["std_length"] == pytest.approx(np.std([4, 10, 6, 8]))
  empty = outcomes.summarize([])
  assert empty["episodes"] == 0 and math.isnan(empty["success_rate"])
  assert (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)
  with pytest.raises(KeyError, match="length"):
    outcomes.summarize([{"success": True, "return": 1.0}])


def test_format_table():
  a = outcomes.summarize([{"success": True, "return": 1.0, "length": 4}] * 8
                      + [{"success": False, "return": 0.0, "length": 20}] * 2)
  b = outcomes.summarize([])
  text = outcomes.format_table({"Q-SFT": a, "BC": b})
  lines = text.splitlines()
  assert len(lines) == 4
  assert lines[0].split()[0] == "policy" and "95% CI" in lines[0]
  assert lines[2].startswith("Q-SFT") and lines[3].startswith("BC")
  assert "80.0%" in lines[2] and "[49.0%, 94.3%]" in lines[2] and "8/10" in lines[2]
  assert "n/a" in lines[3] and "0/0" in lines[3]
  # Columns line up: every row is as wide as the separator or shorter.
  assert all(len(l) <= len(lines[1]) for l in lines)


# --- evaluate ---------------------------------------------------------------- #


class Recording:
  """Wraps a policy; records each episode's instruction and first observation."""

  def __init__(self, inner):
    self.inner = inner
    self.instructions, self.first_obs = [], []
    self._new = False

  def bind_env(self, env):
    if hasattr(self.inner, "bind_env"):
      self.inner.bind_env(env)

  def reset(self, instruction):
    self.instructions.append(instruction)
    self._new = True
    self.inner.reset(instruction)

  def act(self, observation):
    if self._new:
      self.first_obs.append({k: v.copy() for k, v in observation.items()})
      self._new = False
    return self.inner.act(observation)


def test_expert_succeeds_random_much_lower():
  expert, per = loop.evaluate(BABYAI, loop.ExpertPolicy(noise=0.0), 5, seed=0, progress=False)
  assert expert["successes"] == 5 and expert["success_rate"] == 1.0
  assert [r["index"] for r in per] == list(range(5))
  assert all(r["success"] and r["terminated"] and not r["truncated"] for r in per)
  assert all(r["return"] == 1.0 and r["video"] is None for r in per)
  random, per_r = loop.evaluate(BABYAI, loop.RandomPolicy(BABYAI, seed=0), 20, seed=0,
                                progress=False)
  assert random["episodes"] == 20
  assert random["success_rate"] <= 0.6
  assert random["mean_length"] > 3 * expert["mean_length"]
  assert expert["env_id"] == BABYAI and expert["seed"] == 0


def test_same_seed_same_results_and_paired_episodes():
  runs = [loop.evaluate(BABYAI, loop.RandomPolicy(BABYAI, seed=3), 6, seed=7, progress=False)[1]
          for _ in range(2)]
  assert runs[0] == runs[1]
  # A different policy sees the same episodes: same reset seeds, instructions, first frames.
  a, b = Recording(loop.RandomPolicy(BABYAI, seed=1)), Recording(loop.ExpertPolicy())
  per_a = loop.evaluate(BABYAI, a, 6, seed=7, progress=False)[1]
  per_b = loop.evaluate(BABYAI, b, 6, seed=7, progress=False)[1]
  assert [r["reset_seed"] for r in per_a] == [r["reset_seed"] for r in per_b]
  assert a.instructions == b.instructions == [r["instruction"] for r in per_a]
  assert len(a.first_obs) == len(b.first_obs) == 6
  for oa, ob in zip(a.first_obs, b.first_obs):
    assert oa.keys() == ob.keys()
    for k in oa:
      np.testing.assert_array_equal(oa[k], ob[k])
  # Episodes differ from each other, and from another seed.
  assert len({r["reset_seed"] for r in per_a}) == 6
  other = loop.evaluate(BABYAI, loop.ExpertPolicy(), 6, seed=8, progress=False)[1]
  assert [r["reset_seed"] for r in other] != [r["reset_seed"] for r in per_a]


def test_eval_seeds_differ_from_generation_seeds():
  gen = pytest.importorskip("data_tools.generate")
  for seed in (0, 1):
    for i in range(20):
      assert loop.eval_reset_seed(seed, i) != gen.episode_seeds(seed, i)[0]


def test_videos(tmp_path):
  out = tmp_path / "videos"
  summary, per = loop.evaluate(BABYAI, loop.RandomPolicy(BABYAI, seed=0), 4, seed=0,
                               max_steps=12, video_episodes=2, video_dir=str(out),
                               progress=False)
  import imageio.v3 as iio
  files = sorted(os.listdir(out))
  assert len(files) == 2  # nothing else written
  for r in per[:2]:
    path = r["video"]
    assert path and os.path.dirname(path) == str(out) and os.path.exists(path)
    name = os.path.basename(path)
    assert name.startswith(f"episode_{r['index']:03d}_") and name.endswith(".gif")
    assert ("success" if r["success"] else "failure") in name
    assert name[:-4].endswith(loop._slug(r["instruction"]))
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == r["length"] + 1
    assert min(frames.shape[1:3]) >= 128 and frames.shape[3] == 3
  assert all(r["video"] is None for r in per[2:])
  assert all(r["length"] <= 12 for r in per)
  assert summary["max_steps"] == 12


class BadPolicy:

  def __init__(self, bad_action, bad_step=3, bad_episode=1):
    self.bad_action, self.bad_step, self.bad_episode = bad_action, bad_step, bad_episode
    self.episode, self.t = -1, 0

  def reset(self, instruction):
    self.episode += 1
    self.t = 0

  def act(self, observation):
    self.t += 1
    if self.episode == self.bad_episode and self.t - 1 == self.bad_step:
      return np.asarray(self.bad_action, np.float32)
    return np.array([0.0], np.float32)  # turn left: never ends the episode


@pytest.mark.parametrize("bad, message", [
    ([np.nan], "not finite"),
    ([7.0], "allowed values"),
    ([2.5], "allowed values"),
    ([1.0, 2.0], "shape"),
])
def test_bad_actions_raise_naming_episode_and_step(bad, message):
  with pytest.raises(loop.PolicyActionError, match=message) as e:
    loop.evaluate(BABYAI, BadPolicy(bad), 3, seed=0, max_steps=10, progress=False)
  assert "episode 1 " in str(e.value) and "step 3" in str(e.value)


def test_check_action_continuous_bounds(metaworld_spec):
  ok = loop.check_action(np.array([0.5, -1.0, 1.0, 0.0]), metaworld_spec, "here")
  assert ok.dtype == np.float32
  with pytest.raises(loop.PolicyActionError, match=r"episode 2, step 5.*outside its bounds"):
    loop.check_action(np.array([0.5, 1.01, 0.0, 0.0]), metaworld_spec, "episode 2, step 5")
  with pytest.raises(loop.PolicyActionError, match="not finite"):
    loop.check_action(np.array([0.5, np.inf, 0.0, 0.0]), metaworld_spec, "x")


def test_random_policy_within_bounds(metaworld_spec, babyai_spec):
  for spec in (metaworld_spec, babyai_spec):
    p = loop.RandomPolicy(spec, seed=0)
    p.reset("x")
    for _ in range(50):
      loop.check_action(p.act({}), spec, "random")
  assert isinstance(loop.RandomPolicy(metaworld_spec), loop.Actor)
  assert isinstance(loop.ExpertPolicy(), loop.Actor)


def test_expert_policy_must_use_the_evaluated_env():
  from qsft_vla import envs
  with envs.make_env(BABYAI, seed=0) as env:
    summary, _ = loop.evaluate(env, loop.ExpertPolicy(env), 2, seed=0, progress=False)
    assert summary["successes"] == 2
    with pytest.raises(ValueError, match="different env"):
      loop.evaluate(BABYAI, loop.ExpertPolicy(env), 1, seed=0, progress=False)


def test_metaworld_expert_episode(tmp_path):
  summary, per = loop.evaluate("metaworld:reach-v3", loop.ExpertPolicy(noise=0.0), 1, seed=0,
                               max_steps=100, video_episodes=1, video_dir=str(tmp_path),
                               progress=False)
  assert summary["successes"] == 1 and per[0]["length"] < 100
  import imageio.v3 as iio
  frames = iio.imread(per[0]["video"], index=None)
  assert frames.shape[0] == per[0]["length"] + 1 and min(frames.shape[1:3]) >= 128


EVAL_RUN = """
from qsft_vla.evaluation import loop, outcomes
s, _ = loop.evaluate("babyai:BabyAI-GoToLocal-v0", loop.ExpertPolicy(), 1, seed=0,
                     progress=True)
assert s["successes"] == 1
print("TF-FREE OK")
"""


def test_evaluation_is_tf_free():
  assert "TF-FREE OK" in run_without_tensorflow(EVAL_RUN, timeout=120)


def test_paired_sign_test_known_answers():
  # 6 discordant pairs all for A: p = 2 * (1/2)^6.
  r = outcomes.paired_sign_test([1] * 6 + [1, 0], [0] * 6 + [1, 0])
  assert (r["pairs"], r["a_only"], r["b_only"]) == (8, 6, 0)
  assert r["p_value"] == pytest.approx(2 / 64)
  # 3 vs 1 discordant: p = 2 * (C(4,0) + C(4,1)) / 16 = 0.625.
  r = outcomes.paired_sign_test([1, 1, 1, 0, 1], [0, 0, 0, 1, 1])
  assert r["p_value"] == pytest.approx(0.625)
  assert outcomes.paired_sign_test([1, 0], [1, 0])["p_value"] == 1.0
  with pytest.raises(ValueError, match="equal lengths"):
    outcomes.paired_sign_test([1], [1, 0])


def test_auc_known_answers():
  assert outcomes.auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
  assert outcomes.auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
  assert outcomes.auc([0.5] * 4, [0, 1, 0, 1]) == 0.5
  assert outcomes.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  assert outcomes.auc([0.2, 0.3], [1, 1]) is None
  rng = np.random.default_rng(0)   # against all pairs, with ties
  s, y = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
  pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
  assert outcomes.auc(s, y) == pytest.approx(np.mean(pairs))
  with pytest.raises(ValueError, match="3 scores for 2 labels"):
    outcomes.auc([1, 2, 3], [0, 1])


class Valued:
  """A policy that reports a success estimate with each action, as a Q-SFT Controller."""
  has_p = True

  def __init__(self, inner):
    self.inner, self.t = inner, 0

  def bind_env(self, env):
    self.inner.bind_env(env)

  def reset(self, instruction):
    self.t = 0
    self.inner.reset(instruction)

  def act(self, observation, return_info=False):
    assert return_info
    self.t += 1
    return self.inner.act(observation), {"q": None, "success_estimate": 1.0 / self.t}


def test_success_estimates_are_recorded_and_scored():
  summary, per = loop.evaluate(BABYAI, Valued(loop.ExpertPolicy(noise=0.5, seed=1)), 12, seed=3,
                               progress=False)
  for r in per:
    assert r["success_estimate_first"] == 1.0
    assert r["success_estimate_mean"] == pytest.approx(np.mean(1.0 / np.arange(1, r["length"] + 1)))
  assert summary["mean_success_estimate_first"] == 1.0
  # The episode mean falls with the length, so it ranks short (successful) episodes first.
  want = outcomes.auc([r["success_estimate_mean"] for r in per], [r["success"] for r in per])
  assert summary["auc_mean"] == want and summary["auc_first"] in (0.5, None)
  plain, per_plain = loop.evaluate(BABYAI, loop.ExpertPolicy(noise=0.5, seed=1), 2, seed=3,
                                   progress=False)
  assert per_plain[0]["success_estimate_first"] is None and "auc_first" not in plain
