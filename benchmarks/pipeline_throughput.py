"""Input-pipeline throughput: training samples per second at a batch size, on N cores.

Pins the process to --cores CPUs (before TensorFlow starts its thread pools),
builds the training pipeline for --data_dir with --config, warms up (shuffle
buffer fill, autotune), then times --windows windows of --batches batches and
reports the median samples/s (and min/max). --make_synthetic first writes a
random dataset (--episodes x --steps, random images at the config's camera
size) to --data_dir if it does not exist yet.

  python benchmarks/pipeline_throughput.py --data_dir=/tmp/mw_bench --make_synthetic
"""

from __future__ import annotations

import json
import os
import statistics as pystats
import sys
import time

from absl import app, flags

flags.DEFINE_string("data_dir", None, "RLDS dataset directory.", required=True)
flags.DEFINE_string("config", "robot_configs/metaworld.py", "Robot config file[:variant].")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("cores", 2, "CPUs to pin the process to (0 = all).")
flags.DEFINE_integer("warmup_batches", 20, "Batches before timing.")
flags.DEFINE_integer("windows", 5, "Timed windows (the median is reported).")
flags.DEFINE_integer("batches", 20, "Batches per timed window.")
flags.DEFINE_integer("window", None, "Override data.window (history length).")
flags.DEFINE_bool("augment", False, "Enable data.augment.")
flags.DEFINE_bool("deterministic", False, "data.deterministic.")
flags.DEFINE_bool("make_synthetic", False, "Write a random dataset to --data_dir if missing.")
flags.DEFINE_integer("episodes", 50, "--make_synthetic: episodes.")
flags.DEFINE_integer("steps", 50, "--make_synthetic: steps per episode.")
FLAGS = flags.FLAGS


def _make_synthetic(path, spec, episodes, steps):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qsft_vla.data.rlds_writer import RLDSWriter  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  with RLDSWriter(path, spec, name="synthetic_benchmark") as w:
    for e in range(episodes):
      t = np.arange(steps)
      obs = {c.name: rng.randint(0, 256, (steps, c.height, c.width, 3), dtype=np.uint8)
             for c in spec.cameras}
      if spec.state_dim:
        obs["state"] = rng.randn(steps, spec.state_dim).astype(np.float32)
      actions = np.stack([rng.choice(d.values, steps) if d.kind == "discrete"
                          else rng.uniform(d.low, d.high, steps) for d in spec.action_dims], 1)
      success = e % 2 == 0
      reward = np.zeros(steps, np.float32)
      reward[-1] = float(success)
      w.add({"steps": {"observation": obs, "action": actions.astype(np.float32),
                       "reward": reward, "discount": np.ones(steps, np.float32),
                       "is_first": t == 0, "is_last": t == steps - 1,
                       "is_terminal": (t == steps - 1) & success,
                       "language_instruction": ["do the task"] * steps}})


def main(_):
  if FLAGS.cores:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:FLAGS.cores])
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # Imported after pinning, so TensorFlow sizes its thread pools to the pinned cores.
  from qsft_vla import config as qconfig  # pylint: disable=g-import-not-at-top
  from qsft_vla.data import pipeline  # pylint: disable=g-import-not-at-top
  from qsft_vla.robot import RobotSpec  # pylint: disable=g-import-not-at-top
  from qsft_vla.tokenizers.action import ActionTokenizer  # pylint: disable=g-import-not-at-top

  cfg = qconfig.load_config_file(FLAGS.config)
  spec = RobotSpec.from_config(cfg.robot)
  if FLAGS.make_synthetic and not os.path.exists(FLAGS.data_dir):
    _make_synthetic(FLAGS.data_dir, spec, FLAGS.episodes, FLAGS.steps)
  cfg.data.dir = FLAGS.data_dir
  cfg.data.augment.enabled = FLAGS.augment
  cfg.data.deterministic = FLAGS.deterministic
  if FLAGS.window:
    cfg.data.window = FLAGS.window
  stats = None
  if any(not d.bounded for d in spec.action_dims):
    from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
    stats = statistics.load_or_compute(FLAGS.data_dir, spec, cfg.data.split)
  tokenizer = ActionTokenizer.from_robot(spec, stats)

  t0 = time.perf_counter()
  it = pipeline.as_numpy_batches(cfg.data, spec, tokenizer, gamma=cfg.learner.gamma,
                                 batch_size=FLAGS.batch_size,
                                 seed=cfg.seed)
  for _ in range(FLAGS.warmup_batches):
    next(it)
  startup = time.perf_counter() - t0
  rates = []
  for _ in range(FLAGS.windows):
    t = time.perf_counter()
    for _ in range(FLAGS.batches):
      next(it)
    rates.append(FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - t))
  result = {"data_dir": FLAGS.data_dir, "config": FLAGS.config, "batch_size": FLAGS.batch_size,
            "cores": len(os.sched_getaffinity(0)), "window": cfg.data.window,
            "augment": FLAGS.augment, "deterministic": FLAGS.deterministic,
            "startup_s": round(startup, 2),
            "samples_per_s_median": round(pystats.median(rates), 1),
            "samples_per_s_min": round(min(rates), 1), "samples_per_s_max": round(max(rates), 1)}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
