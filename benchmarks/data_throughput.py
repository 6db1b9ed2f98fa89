"""Data benchmarks on real simulated datasets: generation, disk size, input pipeline.

Generates BabyAI GoToLocal and Meta-World pick-place datasets with
data_tools.generate (2 workers, PNG), then measures the training input pipeline
on each at batch 128 (benchmarks/pipeline_throughput.py, pinned to 2 cores, in a
fresh process). Everything runs in one invocation so the figures are side by
side; the machine is shared, so read ratios rather than absolute numbers.

  .venv/bin/python benchmarks/data_throughput.py --out=benchmarks/results/data_throughput.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_string("out", os.path.join(REPO, "benchmarks/results/data_throughput.md"),
                    "Markdown result table to write.")
flags.DEFINE_integer("babyai_episodes", 1000, "BabyAI GoToLocal episodes.")
flags.DEFINE_integer("metaworld_episodes", 60, "Meta-World pick-place episodes.")
flags.DEFINE_integer("workers", 2, "Generation workers.")
FLAGS = flags.FLAGS

CASES = (
    ("babyai:BabyAI-GoToLocal-v0", "robot_configs/babyai.py", "babyai_episodes", (0.0, 0.5, 1.0)),
    ("metaworld:pick-place-v3", "robot_configs/metaworld.py", "metaworld_episodes",
     (0.0, 0.1, 0.3)),
)


def _pipeline(data_dir: str, config: str) -> dict:
  cmd = [sys.executable, os.path.join(REPO, "benchmarks/pipeline_throughput.py"),
         f"--data_dir={data_dir}", f"--config={config}", "--batch_size=128", "--cores=2",
         "--windows=7", "--batches=20"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(_):
  from data_tools.generate import generate  # pylint: disable=g-import-not-at-top
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for env_id, config, episodes_flag, noise in CASES:
      episodes = getattr(FLAGS, episodes_flag)
      out = os.path.join(tmp, env_id.replace(":", "_"))
      s = generate(env_id, episodes, noise, seed=0, out=out, workers=FLAGS.workers,
                   progress=False)
      steady = s["steps"] / max(s["wall_s"] - s["startup_s"], 1e-9)
      p = _pipeline(out, config)
      rows.append((env_id, s, steady, p, noise))
      print(f"{env_id}: {s['env_steps_per_s']:.0f} env steps/s end to end, "
            f"{steady:.0f} after start-up, {s['bytes_per_1k_steps'] / 1e6:.2f} MB per 1k steps, "
            f"pipeline {p['samples_per_s_median']:.0f} samples/s", flush=True)

  lines = [
      "# Data throughput",
      "",
      f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores "
      f"({platform.machine()}), Python {platform.python_version()}, "
      "`.venv/bin/python benchmarks/data_throughput.py`.",
      "Generation: data_tools.generate with 2 worker processes, PNG images, statistics computed while "
      "writing; 'end to end' includes start-up (TensorFlow import, worker start), 'after start-up' "
      "counts from the first finished episode. Pipeline: training mode (shuffle buffer 10,000, "
      "parallel decode), batch 128, pinned to 2 cores, median of 7 windows of 20 batches after 20 "
      "warm-up batches.",
      "",
      "| dataset | noise levels | episodes | steps | success | env steps/s end to end "
      "| env steps/s after start-up | bytes per 1k steps | pipeline samples/s (min-max) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for env_id, s, steady, p, noise in rows:
    lines.append(
        f"| {env_id} | {', '.join(f'{x:g}' for x in noise)} | {s['episodes']} | {s['steps']} | "
        f"{s['success_rate']:.2f} | {s['env_steps_per_s']:.0f} | {steady:.0f} | "
        f"{s['bytes_per_1k_steps'] / 1e6:.2f} MB | {p['samples_per_s_median']:.0f} "
        f"({p['samples_per_s_min']:.0f}-{p['samples_per_s_max']:.0f}) |")
  lines.append("")
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
