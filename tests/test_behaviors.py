"""envs.behaviors: mixture parsing and splitting, and each behaviour in the real simulators."""

import collections

import numpy as np
import pytest

from data_tools import generate as gen
from qsft_vla.envs import behaviors as bh
from qsft_vla.envs import make_env
from qsft_vla.envs.rollout import record_episode

BABYAI = "babyai:BabyAI-GoToLocal-v0"


def parse(text, env_id=BABYAI):
  return bh.parse(text, env_id, {"distractor": False} if env_id.startswith("babyai")
                  else {"biased": True})


def test_parse_labels_weights_and_legacy_noise():
  mix = parse("expert:0.25, distractor:0.6,random:0.15,noisy@0.5:1,quitter@0.5:2")
  assert [b.label for b in mix] == ["expert", "distractor", "random", "noisy@0.5", "quitter@0.5"]
  assert [b.weight for b in mix] == [0.25, 0.6, 0.15, 1.0, 2.0]
  assert [b.noise for b in mix] == [0.0, -1.0, -1.0, 0.5, -1.0]
  assert parse("biased@5:1", "metaworld:reach-v3")[0].label == "biased@5"
  assert [b.label for b in bh.from_noise_levels([0.0, 0.5, 0.5])] == ["expert", "noisy@0.5"]


@pytest.mark.parametrize("text, match", [
    ("", "at least one"),
    ("expert:0", "positive sum"),
    ("expert:-1", ">= 0"),
    ("expert:x", "not a number"),
    ("expert@3:1", "takes no parameter"),
    ("noisy:1", "needs a parameter"),
    ("noisy@2:1", "probability"),
    ("quitter@0:1", r"\(0, 1\]"),
    ("quitter@1.5:1", r"\(0, 1\]"),
    ("biased@5:1", "unknown behaviour 'biased'"),
    ("expert:1,expert:2", "twice"),
    ("noisy@nan:1", "finite"),
])
def test_parse_refuses_bad_entries(text, match):
  with pytest.raises(ValueError, match=match):
    parse(text)


def test_assign_is_exact_and_deterministic():
  mix = parse("expert:0.25,distractor:0.6,random:0.15")
  a = bh.assign(mix, 1000, seed=0)
  assert collections.Counter(b.label for b in a) == {"expert": 250, "distractor": 600,
                                                      "random": 150}
  assert a == bh.assign(mix, 1000, seed=0)
  assert a != bh.assign(mix, 1000, seed=1)
  # Largest remainder: 7 episodes at 1/3 each -> 3, 2, 2 (ties to the earlier entry).
  small = bh.assign(parse("expert:1,random:1,distractor:1"), 7, seed=0)
  assert collections.Counter(b.label for b in small) == {"expert": 3, "random": 2,
                                                         "distractor": 2}


def rollout(env_id, label, index, max_steps=None, **env_kwargs):
  env = make_env(env_id, seed=0, max_steps=max_steps, **env_kwargs)
  try:
    b = parse(f"{label}:1", env_id)[0]
    reset_seed, rng = gen.episode_seeds(0, index)
    actor = bh.EpisodeActor(env, b, rng)
    return record_episode(env, reset_seed, actor.act, behavior=b.label, start=actor.start,
                          stop=actor.done), env
  finally:
    env.close()


def test_babyai_distractor_goes_to_another_object_and_stops_there():
  """The distractor ends its episodes at a wrong object, truncated, in few steps."""
  successes, lengths = 0, []
  for i in range(12):
    ep, _ = rollout(BABYAI, "distractor", i)
    steps = ep["steps"]
    assert ep["episode_metadata"]["behavior"] == "distractor"
    successes += ep["episode_metadata"]["success"]
    lengths.append(len(steps["action"]))
    if not ep["episode_metadata"]["success"]:
      assert not steps["is_terminal"][-1]          # truncated, not a terminal failure
      assert len(steps["action"]) < 64             # ended at its own goal, not the time limit
  expert = [rollout(BABYAI, "expert", i)[0]["episode_metadata"]["success"] for i in range(12)]
  assert all(expert)
  assert successes <= 3  # only when the path passes the real target (or it shares its looks)


def test_babyai_distractor_on_pickup_and_open_levels():
  for level in ("BabyAI-PickupLoc-v0", "BabyAI-OpenDoor-v0"):
    ep, _ = rollout(f"babyai:{level}", "distractor", 0)
    assert ep["episode_metadata"]["behavior"] == "distractor"
    assert len(ep["steps"]["action"]) >= 1


def test_quitter_follows_the_expert_then_acts_randomly():
  b = parse("quitter@0.5:1")[0]
  env = make_env(BABYAI, seed=0)
  try:
    lengths = []
    for i in range(20):
      reset_seed, rng = gen.episode_seeds(0, i)
      actor = bh.EpisodeActor(env, b, rng)
      env.reset(reset_seed)
      actor.start()
      assert 0 <= actor._quit_at <= 0.5 * env.max_steps  # pylint: disable=protected-access
      lengths.append(actor._quit_at)  # pylint: disable=protected-access
    assert len(set(lengths)) > 5
  finally:
    env.close()


def test_random_actions_cover_the_action_space():
  env = make_env(BABYAI, seed=0)
  rng = np.random.default_rng(0)
  seen = {int(env.random_action(rng)[0]) for _ in range(200)}
  env.close()
  assert seen == set(range(7))


def test_systematic_behaviour_unknown_to_a_simulator_is_refused():
  env = make_env(BABYAI, seed=0)
  try:
    with pytest.raises(ValueError, match="no systematic behaviour 'biased'"):
      env.start_systematic("biased", 5.0, np.random.default_rng(0))
  finally:
    env.close()


@pytest.mark.slow
def test_metaworld_biased_misses_and_stops_hovering():
  """reach-v3: the expert reaches, the policy aimed 10 cm off does not and stops early."""
  exp, _ = rollout("metaworld:reach-v3", "expert", 0, max_steps=150, task_index=0)
  assert exp["episode_metadata"]["success"]
  ep, _ = rollout("metaworld:reach-v3", "biased@10", 0, max_steps=150, task_index=0)
  assert ep["episode_metadata"]["behavior"] == "biased@10"
  assert not ep["episode_metadata"]["success"]
  assert len(ep["steps"]["action"]) < 150 and not ep["steps"]["is_terminal"][-1]
  rng = np.random.default_rng(0)
  env = make_env("metaworld:reach-v3", seed=0)
  a = env.random_action(rng)
  env.close()
  assert a.shape == (4,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)


def test_behavior_mixture_through_the_generator(tmp_path, babyai_spec):
  from qsft_vla.data import rlds_reader  # pylint: disable=g-import-not-at-top
  s = gen.generate(BABYAI, 6, None, 0, str(tmp_path / "mix"), behavior="expert:1,distractor:1",
                   workers=1, progress=False)
  assert {k: v["episodes"] for k, v in s["per_behavior"].items()} == {"distractor": 3,
                                                                      "expert": 3}
  assert s["per_behavior"]["expert"]["success_rate"] == 1.0
  labels = [ep["episode_metadata"]["behavior"]
            for _, ep in rlds_reader.iterate_episodes(s["out"], babyai_spec)]
  assert labels == [b.label for _, b in gen.plan(BABYAI, 6, 0, behavior="expert:1,distractor:1")]


def test_greedy_disagreement_known_answers():
  env = make_env(BABYAI, seed=0)
  try:
    def d(text):
      return bh.greedy_disagreement(env, parse(text), 8, 0, [7])
    assert d("expert:1")["disagreement"] == 0.0
    assert d("noisy@0.5:1,quitter@0.5:1")["disagreement"] == 0.0   # the expert stays the mode
    # The distractor outweighs the expert: disagreement wherever its action differs, and
    # never where they agree; outweighed, never.
    heavy = d("expert:0.3,distractor:0.7")
    assert heavy["disagreement"] == heavy["systematic_differs"] > 0.2
    assert d("expert:0.7,distractor:0.3")["disagreement"] == 0.0
    assert d("expert:0.25,distractor:0.6,random:0.15")["states"] == heavy["states"]
  finally:
    env.close()
