"""The evaluation binary: closed-loop BabyAI episodes through the Controller, JSON results, GIFs."""

import glob
import json
import os
import subprocess
import sys

import pytest

from checkpoint_fixture import REPO, write_checkpoint
from conftest import ROBOT_HOST_ABSENT, run_without_tensorflow
from qsft_vla.policy import checkpoints
from qsft_vla import config as qconfig
from qsft_vla import evaluate

TASK = "BabyAI-GoToLocal-v0"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return write_checkpoint(tmp_path_factory.mktemp("eval_qsft"), "babyai", "qsft", step=7)


def test_binary_writes_results_and_videos_without_tensorflow(workdir):
  out = run_without_tensorflow(f"""
      import sys
      from absl import app
      from qsft_vla import evaluate
      sys.argv = ["evaluate", "--workdir={workdir}", "--episodes=2", "--video_episodes=1",
                  "--max_steps=8", "--seed=3", "--progress=false"]
      evaluate._define_flags()
      try:
        app.run(evaluate.main)
      except SystemExit as e:
        assert e.code in (0, None), e.code
  """, absent=ROBOT_HOST_ABSENT)
  extraction, beta = _run_extraction()
  assert _label(extraction, beta) in out and f"{TASK}-seed3.json" in out  # the table, the path

  with open(os.path.join(workdir, "eval", f"{TASK}-seed3.json")) as f:
    result = json.load(f)
  assert result["episodes"] == 2 and result["seed"] == 3
  assert 0.0 <= result["ci_low"] <= result["success_rate"] <= result["ci_high"] <= 1.0
  assert result["env"] == f"babyai:{TASK}" and result["algorithm"] == "qsft"
  assert result["beta"] == beta and result["temperature"] == 0.0  # the run's, for its extraction
  assert result["checkpoint_step"] == 7 and result["max_steps"] == 8
  episodes = result["per_episode"]
  assert len(episodes) == 2 and all(1 <= e["length"] <= 8 for e in episodes)
  assert result["mean_length"] == sum(e["length"] for e in episodes) / 2
  assert "mean_return" in result and result["wall_seconds"] > 0
  latency = result["latency_ms"]
  assert latency["calls"] == sum(e["length"] for e in episodes)
  assert 0 < latency["p50_ms"] <= latency["p99_ms"]

  videos = glob.glob(os.path.join(workdir, "eval", "videos", f"{TASK}-seed3", "*.gif"))
  assert videos == [episodes[0]["video"]] and episodes[1]["video"] is None


def _run_extraction():
  """(extraction, its beta) of the BabyAI config's Q-SFT, which the workdir's run has."""
  lc = qconfig.load_config_file(os.path.join(REPO, "robot_configs", "babyai.py")).learner
  return lc.extraction, lc.beta if lc.extraction == "p" else lc.ratio_beta


def _label(extraction, beta):
  """The table's row name: the paper's "p" goes unnamed."""
  return f"qsft (beta={beta!r})" if extraction == "p" else f"qsft ({extraction}, beta={beta!r})"


def test_explicit_beta_names_the_output(workdir):
  proc = subprocess.run(
      [sys.executable, "-m", "qsft_vla.evaluate", f"--workdir={workdir}/checkpoints", "--beta=0.5",
       "--episodes=1", "--video_episodes=1", "--max_steps=3", "--seed=4", "--progress=false"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  extraction, _ = _run_extraction()  # --beta is the beta of the run's extraction
  assert _label(extraction, 0.5) in proc.stdout
  stem = f"{TASK}-seed4-beta0.5"
  with open(os.path.join(workdir, "eval", f"{stem}.json")) as f:  # the workdir's eval/
    result = json.load(f)
  assert result["beta"] == 0.5 and result["label"] == _label(extraction, 0.5)
  assert result["extraction"] == extraction
  assert len(glob.glob(os.path.join(workdir, "eval", "videos", stem, "*.gif"))) == 1
  assert not os.path.exists(os.path.join(workdir, "eval", f"{TASK}-seed4.json"))


def test_defaults_come_from_the_checkpoint_config(workdir):
  result = evaluate.run(workdir, episodes=1, video_episodes=0, progress=False)
  assert result["env"] == f"babyai:{TASK}"  # robot_configs/babyai.py eval section
  assert result["seed"] == 1000 and result["max_steps"] == 64
  assert result["video_dir"] is None and result["per_episode"][0]["video"] is None
  assert result["json"] == os.path.join(workdir, "eval", f"{TASK}-seed1000.json")
  assert os.path.isfile(result["json"])


def test_bad_requests_fail_clearly(workdir, tmp_path):
  with pytest.raises(ValueError, match="robot 'babyai'.*metaworld"):
    evaluate.run(workdir, env="metaworld:pick-place-v3", episodes=1)
  with pytest.raises(ValueError, match="episodes"):
    evaluate.run(workdir, episodes=0)
  bc = write_checkpoint(tmp_path / "bc", "babyai", "bc", **{"eval.env": ""})
  with pytest.raises(ValueError, match="p_theta"):
    evaluate.run(bc, env=f"babyai:{TASK}", episodes=1, beta=1.0)
  with pytest.raises(ValueError, match="eval.env"):
    evaluate.run(bc, episodes=1)
  proc = subprocess.run([sys.executable, "-m", "qsft_vla.evaluate",
                         f"--workdir={tmp_path / 'nothing'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("evaluate: error:") and "nothing" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_damaged_latest_step_falls_back_to_the_newest_intact_one(tmp_path, capsys):
  work = write_checkpoint(tmp_path / "run", "babyai", "bc", step=3)
  write_checkpoint(work, "babyai", "bc", step=7)
  meta = os.path.join(work, "checkpoints", "7", "meta", "metadata")
  with open(meta, "a") as f:
    f.write(" ")
  result = evaluate.run(str(work), episodes=1, max_steps=4, video_episodes=0, progress=False)
  assert result["checkpoint_step"] == 3
  assert "skipping a damaged checkpoint" in capsys.readouterr().err
  with pytest.raises(checkpoints.CheckpointError, match="7: damaged"):  # an explicit step stays
    evaluate.run(str(work), checkpoint_step=7, episodes=1, max_steps=4, progress=False)
