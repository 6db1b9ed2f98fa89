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
  return {"task": task, "seeds": [0, 1, 2], "env": pq.TASKS[task].env,
          "behavior": pq.TASKS[task].behavior,
          "data_success": 0.3, "data_episodes": 4000, "expert": _pooled(1.0),
          "qsft_choice": {"extraction": "ratio", "beta": 16.0, "val_success": q},
          "beta_sweep_val": {e: {str(x): q * x / 32 for x in pq.BETAS} for e in pq.EXTRACTIONS},
          "qsft_vs_bc": {"pairs": 300, "a_only": 60, "b_only": 10, "p_value": 1e-9},
          "qsft_vs_filtered_bc": {"pairs": 300, "a_only": 30, "b_only": 20, "p_value": 0.2},
          "methods": {m: {"test": _pooled(v), "per_seed": [v] * 3,
                          "curve": {"1000": v / 2, "2000": v}}
                      for m, v in (("qsft", q), ("bc", b), ("filtered_bc", f))}}


def test_table_and_plots(tmp_path):
  pq.FLAGS(["policy_quality"])
  results = [_result("gotolocal", 0.7, 0.4, 0.5), _result("reach", 0.9, 0.2, 0.8)]
  # A summary made before the sweep grew draws the betas it has.
  results[1]["beta_sweep_val"] = {e: {b: v for b, v in s.items() if float(b) <= 32}
                                  for e, s in results[1]["beta_sweep_val"].items()}
  text = pq.table(results)
  assert "| gotolocal | 0,1,2 | 1000 x 64 |" in text and "70.0% [60, 80]" in text
  assert "| reach | 0,1,2 | 1500 x 32 |" in text  # a summary without steps: its size's
  # Q-SFT's networks: recorded, or "separate" for summaries from before they were.
  assert "| separate | ratio, beta 16" in text
  assert "| pi_head | ratio, beta 16" in pq.table([{**results[0], "architecture": "pi_head"}])
  assert "ratio, beta 16" in text and "| 60 vs 10, p = 1e-09 | 30 vs 20, p = 0.2 |" in text
  assert "| 60 vs 10, p = 1e-09 |  |" in pq.table([{**results[1], "qsft_vs_filtered_bc": None}])
  assert "Average over 2 task(s): Q-SFT 80.0%, BC 30.0%, filtered BC 65.0%" in text
  assert "Q-SFT at >= 90% of the expert on 1 of 2" in text
  results[0]["methods"]["qsft"]["curve_policy"] = {"extraction": "p", "beta": 64.0}
  assert pq.curve_label(results[0], "qsft") == "Q-SFT (p, beta 64)"
  assert pq.curve_label(results[1], "qsft") == "Q-SFT"  # a summary from before it was recorded
  assert pq.curve_label(results[0], "bc") == "BC"
  paths = pq.plots(results, str(tmp_path / "pq"))
  assert [os.path.basename(p) for p in paths] == ["pq_success.png", "pq_beta.png",
                                                  "pq_steps.png"]
  for p in paths:
    assert os.path.getsize(p) > 5000


def test_a_task_trains_longer_by_its_factor_and_the_table_says_so():
  pq.FLAGS(["policy_quality", "--size=medium"])
  base = pq.SIZES["medium"]["babyai"]
  slow = pq.Task("babyai:BabyAI-PickupLoc-v0", "expert:1", steps_factor=2)
  assert pq.task_size(slow) == {**base, "steps": 2 * base["steps"]}
  assert pq.task_size(pq.Task("babyai:BabyAI-GoToLocal-v0", "expert:1")) == base
  assert base["steps"] == 2000  # task_size copies: the size itself is unchanged
  short = pq.Task("babyai:BabyAI-OpenDoor-v0", "expert:1", max_steps=64)
  assert pq.task_size(short) == {**base, "max_steps": 64} and base["max_steps"] is None
  result = {**_result("pickuploc", 0.5, 0.2, 0.6), "steps": 4000, "batch": 64}
  assert "| pickuploc | 0,1,2 | 4000 x 64 |" in pq.table([result])
  pq.FLAGS.unparse_flags()


def test_a_size_runs_its_own_tasks_and_sweeps(tmp_path, monkeypatch):
  """Without --tasks a size runs its tasks (small: one per simulator); --tasks picks others."""
  ran = []
  monkeypatch.setattr(pq, "run_task", lambda name, seeds: ran.append(name) or
                      _result(name, 0.5, 0.2, 0.6))
  monkeypatch.setattr(pq, "plots", lambda results, prefix: [])
  for argv, want in ((["--size=small"], ["gotolocal", "reach"]),
                     (["--size=medium", "--tasks=push"], ["push"])):
    ran.clear()
    pq.FLAGS(["policy_quality", *argv, f"--results={tmp_path}"])
    assert pq.main(["policy_quality"]) == 0 and ran == want
    pq.FLAGS.unparse_flags()
  assert sorted(os.listdir(tmp_path / "policy_quality_small")) == ["gotolocal.json", "reach.json"]
  assert pq.SIZES["medium"]["tasks"] == tuple(pq.TASKS)
  # small's Meta-World task sweeps the configs' extraction alone (its evaluations are slow).
  assert pq.SIZES["small"]["metaworld"]["extractions"] == (pq.default_choice(pq.TASKS["reach"])[0],)
  # ... and trains Q-SFT as pi_head (its cost near BC's); the baselines as configured.
  cmds = []
  monkeypatch.setattr(pq, "_run", lambda cmd, log: cmds.append(cmd))
  pq.FLAGS(["policy_quality", "--size=small", f"--workdir={tmp_path}"])
  size = pq.task_size(pq.TASKS["reach"])
  for method in ("qsft", "bc"):
    pq.train("reach", pq.TASKS["reach"], size, method, 0, "data")
  pq.FLAGS.unparse_flags()
  assert [c[3] for c in cmds] == ["--config=robot_configs/metaworld.py:qsft+pi_head",
                                  "--config=robot_configs/metaworld.py:bc"]


def test_summaries_from_several_runs_make_one_table(tmp_path):
  """Tasks run at different times share the table; a rerun of a task replaces its row."""
  pq.FLAGS(["policy_quality"])
  folder = str(tmp_path / "policy_quality_small")
  pq.write_summary(folder, _result("reach", 0.9, 0.2, 0.8))
  pq.write_summary(folder, _result("gotolocal", 0.7, 0.4, 0.5))
  pq.write_summary(folder, _result("gotolocal", 0.6, 0.4, 0.5))
  (tmp_path / "policy_quality_small" / "notes.json").write_text("{}")  # not a task: ignored
  results = pq.task_summaries(folder)
  assert [r["task"] for r in results] == ["gotolocal", "reach"]  # the order of TASKS
  assert results[0]["methods"]["qsft"]["test"]["mean"] == 0.6
  assert not any(n.endswith(".tmp") for n in os.listdir(folder))
  # A summary without curves or a sweep (e.g. BC and filtered BC only) still plots.
  bare = _result("push", 0.5, 0.5, 0.5)
  del bare["beta_sweep_val"], bare["qsft_choice"], bare["qsft_vs_bc"], bare["methods"]["qsft"]
  for m in bare["methods"].values():
    m["curve"] = {}
  text = pq.table(results + [bare])
  assert "| push |" in text and "Average over 2 task(s)" in text
  assert len(pq.plots(results + [bare], str(tmp_path / "pq"))) == 3
  # --tasks= rebuilds the table and plots from the summaries alone.
  pq.FLAGS(["policy_quality", "--tasks=", f"--results={tmp_path}"])
  assert pq.main(["policy_quality"]) == 0
  pq.FLAGS.unparse_flags()
  text = (tmp_path / "policy_quality_small.md").read_text()
  assert "| gotolocal |" in text and "| reach |" in text and "this run" not in text
  assert (tmp_path / "policy_quality_small_beta.png").exists()


def test_unknown_task_is_refused():
  pq.FLAGS(["policy_quality", "--tasks=gotolocal,nope"])
  with pytest.raises(Exception, match="unknown tasks"):
    pq.main(["policy_quality"])
  pq.FLAGS.unparse_flags()


def test_choice_on_validation_breaks_ties_to_p_then_the_smaller_beta():
  # Two means of the same three successes, summed in another order: equal, not bitwise.
  a = (0.43333333333333335 + 0.3333333333333333 + 0.4) / 3
  b = (0.4 + 0.43333333333333335 + 0.3333333333333333) / 3
  assert a != b
  assert pq.choose({"sample": {16.0: min(a, b), 32.0: max(a, b)}}) == ("sample", 16.0)
  assert pq.choose({"ratio": {4.0: 0.5}, "p": {8.0: 0.5}}) == ("p", 8.0)
  assert pq.choose({"ratio": {4.0: 0.6}, "p": {8.0: 0.5, 0.0: 0.2}}) == ("ratio", 4.0)


def test_cached_evaluations_must_match_the_runs_checkpoint_and_proposal(tmp_path, monkeypatch):
  """An evaluation file is reused unless it is of an earlier checkpoint (the run has
  since trained further) or a "sample" one drawn from another proposal than the
  run's (files from before sample_proposal drew from pi alone)."""
  import json  # pylint: disable=g-import-not-at-top
  from qsft_vla.learning import spec  # pylint: disable=g-import-not-at-top
  pq.FLAGS(["policy_quality"])
  task, size = pq.TASKS["gotolocal"], pq.SIZES["small"]["babyai"]
  workdir = tmp_path / "run"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"learner": spec.LearnerConfig().to_dict()}))
  calls = []
  monkeypatch.setattr(pq.evaluate_lib, "run", lambda *a, **k: calls.append(k) or {"fresh": 1})

  def cached(extraction, beta, content, step=size["steps"]):
    stem = pq.evaluate_lib.output_stem(task.env, 5000, beta, extraction)
    content = {**content, "checkpoint_step": step}
    (workdir / "eval" / f"{stem}.json").write_text(json.dumps(content))
    return pq.evaluate(str(workdir), task, size, 5000, extraction, beta)

  assert cached("ratio", 4.0, {"old": 1})["old"] == 1
  assert cached("sample", 4.0, {"sampling": {"sample_proposal": "pi+p"}})["sampling"]
  assert not calls
  assert cached("sample", 8.0, {"old": 1}) == {"fresh": 1}  # no record: drawn from pi
  assert cached("sample", 2.0, {"sampling": {"sample_proposal": "pi"}}) == {"fresh": 1}
  assert cached("ratio", 1.0, {"old": 1}, step=size["steps"] // 2) == {"fresh": 1}
  assert cached("sample", 16.0, {"sampling": {"sample_proposal": "pi+p"}},
                step=size["steps"] // 2) == {"fresh": 1}
  assert [c["extraction"] for c in calls] == ["sample", "sample", "ratio", "sample"]


def test_one_choice_for_every_task_and_leave_one_task_out():
  pq.FLAGS(["policy_quality"])
  sweeps = {"gotolocal": (0.5, 0.8), "pickuploc": (0.9, 0.6), "reach": (0.4, 0.7)}
  results = []
  for task, (p64, s32) in sweeps.items():
    r = _result(task, 0.5, 0.2, 0.6)
    # Cells every task has are compared; reach's extra cell is not.
    r["beta_sweep_val"] = {"p": {"64.0": p64}, "sample": {"32.0": s32}}
    results.append(r)
  results[2]["beta_sweep_val"]["ratio"] = {"8.0": 1.0}
  lines = "\n".join(pq.one_choice(results))
  # Means: p 0.6, sample 0.7.
  assert "sample, beta 32 has the best mean over the 3 tasks' sweeps (70%)" in lines
  # Left out: pickuploc and reach tie p with sample on the others (ties go to p).
  assert "| gotolocal | p, beta 64 | 50% |" in lines
  assert "| pickuploc | sample, beta 32 | 60% |" in lines
  assert "| reach | p, beta 64 | 40% |" in lines
  assert "robot config's default" not in lines  # no summary tested it
  results[0]["qsft_default"] = {"extraction": "sample", "beta": 32.0, "val_success": 0.8,
                                "test": _pooled(0.75)}
  assert "test stream: gotolocal 75.0% (sample, beta 32)" in "\n".join(pq.one_choice(results))
  assert pq.one_choice(results[:1]) == []  # one task: nothing to leave out
  assert "One choice for every task" in pq.table(results)


def test_default_choice_reads_the_robot_config():
  pq.FLAGS(["policy_quality"])
  for task in pq.TASKS.values():
    lc = pq.qconfig.load_config_file(
        os.path.join(REPO, "robot_configs", f"{task.robot}.py:qsft")).learner
    e, b = pq.default_choice(task)
    assert e == lc.extraction and b == (lc.beta if e == "p" else lc.ratio_beta)


def test_run_architecture_reads_the_runs_config(tmp_path):
  (tmp_path / "config.json").write_text('{"learner": {"architecture": "pi_head"}}')
  assert pq.run_architecture(str(tmp_path)) == "pi_head"


def test_evaluations_run_in_parallel_equal_the_serial_ones(tmp_path):
  """--jobs=2 evaluates groups in worker processes; every file equals the serial one's."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from checkpoint_fixture import write_checkpoint  # pylint: disable=g-import-not-at-top
  task = pq.TASKS["gotolocal"]
  size = {"eval_episodes": 3, "max_steps": 6, "steps": 1}
  serial = write_checkpoint(tmp_path / "serial")
  parallel = str(tmp_path / "parallel")
  shutil.copytree(serial, parallel)
  groups = [(parallel, 5, "p", (0.0, 200.0)), (parallel, 5, "ratio", (4.0,))]
  pq.FLAGS(["policy_quality", "--jobs=2"])
  try:
    pq._prefetch(task, size, groups)  # pylint: disable=protected-access
  finally:
    pq.FLAGS.unparse_flags()
  files = sorted(os.listdir(os.path.join(parallel, "eval")))
  assert len([f for f in files if f.endswith(".json")]) == 3
  for _, seed, e, betas in groups:
    for b in betas:
      want = pq.evaluate(serial, task, size, seed, e, b)
      stem = pq.evaluate_lib.output_stem(task.env, seed, b, e)
      with open(os.path.join(parallel, "eval", stem + ".json")) as f:
        got = json.load(f)
      strip = lambda r: [{k: v for k, v in x.items() if k != "video"} for x in r["per_episode"]]
      assert strip(got) == strip(want) and got["beta"] == want["beta"] == b
