"""training/q_gap: the Q-gap diagnostic's known answers, and the probe on a real run."""

import json
import os

import numpy as np
import pytest

from qsft_vla.training import q_gap, q_gap_checkpoints


def test_summarize_known_answer():
  q = np.array([0.9, 0.7, 0.2, 0.4, 0.6, 5.0])
  labels = np.array(["expert", "expert", "distractor", "distractor", "random", ""])
  agree_pi = np.array([True, False, True, True, True, True])
  agree_policy = np.array([True, True, False, False, False, False])
  agree_q = np.array([False, False, True, True, True, True])
  q_choice = np.array([0.9, 0.75, 0.1, 0.1, 0.1, 0.1])  # expert step 1: pi chose another action
  out = q_gap.summarize(q, agree_pi, agree_policy, labels, agree_q, q_choice)
  assert out["q_gap/agree_q"] == 0.0
  assert out["q_gap/q_fixes"] == 0.0 and out["q_gap/q_breaks"] == pytest.approx(0.5)
  assert out["q_gap/q_expert_where_pi_wrong"] == pytest.approx(0.7)
  assert out["q_gap/q_pi_choice_where_pi_wrong"] == pytest.approx(0.75)
  assert out["q_gap/q_expert"] == pytest.approx(0.8)
  assert out["q_gap/q_distractor"] == pytest.approx(0.3)
  assert out["q_gap/q_random"] == pytest.approx(0.6)
  assert out["q_gap/gap"] == pytest.approx(0.8 - 0.4)   # unlabelled steps are left out
  assert out["q_gap/agree_pi"] == pytest.approx(0.5)
  assert out["q_gap/agree_policy"] == pytest.approx(1.0)
  sample = q_gap.summarize(q, agree_pi, None, labels, agree_q, q_choice)  # no per-token policy
  assert "q_gap/agree_policy" not in sample and sample["q_gap/gap"] == out["q_gap/gap"]
  bc = q_gap.summarize(None, agree_pi, None, labels)
  assert bc == {"q_gap/agree_pi": pytest.approx(0.5)}
  assert q_gap.summarize(q, agree_pi, agree_policy, np.array([""] * 6)) == {}


@pytest.mark.slow
@pytest.mark.parametrize("extraction", ["p", "sample"])
def test_probe_during_training(tmp_path, extraction):
  """A Q-SFT run on a behaviour mixture, the probe on a held-out split, with the MC bound;
  and the periodic closed-loop evaluation (with the run's extraction)."""
  from data_tools import generate  # pylint: disable=g-import-not-at-top
  from qsft_vla import config as qconfig, train  # pylint: disable=g-import-not-at-top
  from conftest import BABYAI_CONFIG  # pylint: disable=g-import-not-at-top
  data = str(tmp_path / "mix")
  generate.generate("babyai:BabyAI-GoToLocal-v0", 24, None, 0, data,
                    behavior="expert:1,distractor:1,random:1", max_steps=20, workers=1,
                    progress=False)
  assert set(q_gap.episode_behaviors(data).values()) == {"expert", "distractor", "random"}
  cfg = qconfig.load_config_file(BABYAI_CONFIG + ":qsft")
  cfg.data.dir = data
  cfg.data.split = "train[:75%]"
  cfg.eval.q_gap_split = "train[75%:]"
  cfg.learner.mc_lower_bound = True
  cfg.learner.extraction, cfg.learner.sample_k = extraction, 4
  cfg.train.num_steps = 4
  cfg.train.batch_size = 8
  cfg.train.checkpoint_every = 2
  cfg.train.log_every = 2
  cfg.model.rt1_small.width = 32
  # Closed-loop evaluation during training, through the robot-host Controller.
  cfg.eval.env, cfg.eval.every, cfg.eval.episodes = "babyai:BabyAI-GoToLocal-v0", 4, 2
  cfg.eval.max_steps, cfg.eval.video_episodes = 8, 0
  train.train(cfg, str(tmp_path / "run"))
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
  evals = [r for r in rows if "eval/success_rate" in r]
  assert [r["step"] for r in evals] == [4] and 0.0 <= evals[0]["eval/success_rate"] <= 1.0
  gaps = [r for r in rows if "q_gap/gap" in r]
  assert [r["step"] for r in gaps] == [2, 4]
  for r in gaps:
    assert 0.0 <= r["q_gap/agree_pi"] <= 1.0 and np.isfinite(r["q_gap/q_expert"])
    assert 0.0 <= r["q_gap/agree_q"] <= 1.0
    assert ("q_gap/agree_policy" in r) == (extraction == "p")
    assert 0.0 <= r["q_gap/q_fixes"] <= 1.0 and 0.0 <= r["q_gap/q_breaks"] <= 1.0
  # The same figures from the saved checkpoints, after the run (the run's own config).
  again = q_gap_checkpoints.probe_checkpoint(str(tmp_path / "run"), "train[75%:]", [2, 4])
  for r in gaps:
    logged = {k: v for k, v in r.items() if k.startswith("q_gap/")}
    assert again[r["step"]] == pytest.approx(logged, rel=1e-5, abs=1e-6)
