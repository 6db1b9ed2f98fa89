"""benchmarks/policy_quality.py: the table and plots from results (no training here)."""

import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import policy_quality as pq  # noqa: E402  pylint: disable=g-import-not-at-top


def _pooled(mean):
  return {"mean": mean, "lo": max(0.0, mean - 0.1), "hi": min(1.0, mean + 0.1), "n": 300}


def _result(task, q, b, f):
  return {"task": task, "env": pq.TASKS[task].env, "behavior": pq.TASKS[task].behavior,
          "data_success": 0.3, "data_episodes": 4000, "expert": _pooled(1.0),
          "qsft_choice": {"extraction": "ratio", "beta": 16.0, "val_success": q},
          "beta_sweep_val": {e: {str(x): q * x / 32 for x in pq.BETAS} for e in pq.EXTRACTIONS},
          "qsft_vs_bc": {"pairs": 300, "a_only": 60, "b_only": 10, "p_value": 1e-9},
          "methods": {m: {"test": _pooled(v), "per_seed": [v] * 3,
                          "curve": {"1000": v / 2, "2000": v}}
                      for m, v in (("qsft", q), ("bc", b), ("filtered_bc", f))}}


def test_table_and_plots(tmp_path):
  pq.FLAGS(["policy_quality"])
  results = [_result("gotolocal", 0.7, 0.4, 0.5), _result("reach", 0.9, 0.2, 0.8)]
  text = pq.table(results, [0, 1, 2])
  assert "| gotolocal |" in text and "70.0% [60, 80]" in text and "ratio, beta 16" in text
  assert "60 vs 10, p = 1e-09" in text
  assert "Q-SFT 80.0%, BC 30.0%, filtered BC 65.0%" in text
  paths = pq.plots(results, str(tmp_path / "pq"))
  assert [os.path.basename(p) for p in paths] == ["pq_success.png", "pq_beta.png",
                                                  "pq_steps.png"]
  for p in paths:
    assert os.path.getsize(p) > 5000


def test_unknown_task_is_refused():
  pq.FLAGS(["policy_quality", "--tasks=gotolocal,nope"])
  with pytest.raises(Exception, match="unknown tasks"):
    pq.main(["policy_quality"])
  pq.FLAGS.unparse_flags()
