"""The README's main job (scripts/default_job.sh, run by scripts/main.sh) at a tiny size:
generate, validate, train Q-SFT, BC and filtered BC, evaluate all three, print the comparison."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

TINY_MODEL = ("--config.model.rt1_small.conv_channels=(8,8,8) --config.model.rt1_small.width=32 "
              "--config.model.rt1_small.depth=1 --config.model.rt1_small.num_heads=2 "
              "--config.model.rt1_small.tokens_per_image=2 "
              "--config.train.batch_size=8 --config.data.shuffle_buffer=32 "
              "--config.train.log_every=1 --config.train.checkpoint_every=2")


@pytest.mark.slow
def test_default_job_tiny(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, DATA=str(tmp_path / "data"),
             RUNS=str(tmp_path / "runs"), EPISODES="6", STEPS="2", EVAL_EPISODES="2",
             TRAIN_FLAGS=TINY_MODEL)
  r = subprocess.run(["bash", os.path.join(REPO, "scripts", "default_job.sh")], env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
  for method in ("qsft", "bc", "filtered_bc"):
    assert os.path.isfile(tmp_path / "runs" / method / "eval" /
                          "BabyAI-GoToLocal-v0-seed1000.json")
  table = (tmp_path / "runs" / "comparison.md").read_text()
  assert "Q-SFT" in table and "BC" in table and "filtered BC" in table and "McNemar" in table
  assert "distractor" in r.stdout  # the behaviour mixture, per behaviour
  assert table.strip() in r.stdout.replace("```", "").strip() or "Q-SFT" in r.stdout
