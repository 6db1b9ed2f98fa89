"""Offline-to-online: does fresh experience from actors improve an offline Q-SFT policy?

  .venv/bin/python benchmarks/offline_to_online.py [--env=babyai:BabyAI-GoToLocal-v0] \
      [--episodes=1000] [--offline_steps=1000] [--online_steps=1000] [--actors=2] \
      [--workdir=runs/offline_to_online] [--out=benchmarks/results/offline_to_online.md]

1. Data: data_tools.generate with the policy-quality suite's BabyAI mixture
   (25% expert, 75% the distractor), --episodes episodes.
2. Offline: Q-SFT through the training binary for --offline_steps steps.
3. Two continuations of that checkpoint for --online_steps more steps each,
   from copies of its workdir:
   - offline only: the same data, the same binary (the control: more steps alone);
   - online: a Reverb server holding the offline data, --actors actors
     (qsft_vla.replay.actor: the learner's newest checkpoint, epsilon-greedy) that
     insert every episode, and the learner sampling half of each batch from the
     server and half from the offline data (data.reverb.weight 0.5).
4. All three checkpoints are evaluated through qsft_vla.evaluate on the same test
   episodes (--test_seed), each with the run's own configured extraction and beta.
Writes a table with success, 95% intervals, paired tests and the actors' episodes.
Every process started here is stopped at the end, also on failure.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import evaluate as evaluate_lib  # noqa: E402
from qsft_vla.evaluation import outcomes  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("env", "babyai:BabyAI-GoToLocal-v0", "BabyAI task")
flags.DEFINE_string("behavior", "expert:0.25,distractor:0.75", "the offline data's mixture")
flags.DEFINE_integer("episodes", 1000, "offline episodes")
flags.DEFINE_integer("offline_steps", 1000, "offline training steps")
flags.DEFINE_integer("online_steps", 1000, "steps of each continuation")
flags.DEFINE_integer("actors", 2, "actor processes in the online continuation")
flags.DEFINE_float("epsilon", 0.1, "actors' per-step chance of a random action")
flags.DEFINE_integer("eval_episodes", 100, "test episodes per checkpoint")
flags.DEFINE_integer("test_seed", 1000, "test stream")
flags.DEFINE_integer("seed", 0, "training seed")
flags.DEFINE_string("workdir", "runs/offline_to_online", "data, runs and logs (kept)")
flags.DEFINE_string("out", "benchmarks/results/offline_to_online.md", "the table")

CONFIG = "robot_configs/babyai.py:qsft"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(cmd, log):
  logging.info("%s: %.0f s", " ".join(cmd[1:3]), report.run_binary(cmd, log))


def _train(workdir, data, steps, *extra):
  return [sys.executable, "-m", "qsft_vla.train", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.dir={data}", f"--config.seed={FLAGS.seed}",
          f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=100",
          "--config.eval.every=0", *extra]


def _stop(procs):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGINT)
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _evaluate(workdir):
  return evaluate_lib.run(workdir, env=FLAGS.env, episodes=FLAGS.eval_episodes,
                          seed=FLAGS.test_seed, video_episodes=0, progress=False)


def main(argv):
  del argv
  root = os.path.abspath(FLAGS.workdir)
  os.makedirs(root, exist_ok=True)
  data = os.path.join(root, "data")
  if not os.path.exists(os.path.join(data, "dataset_info.json")):
    _run([sys.executable, "-m", "data_tools.generate", f"--env={FLAGS.env}",
          f"--episodes={FLAGS.episodes}", f"--behavior={FLAGS.behavior}", "--seed=0",
          f"--out={data}"], data + ".log")
  offline = os.path.join(root, "offline")
  if not os.path.isdir(os.path.join(offline, "checkpoints", str(FLAGS.offline_steps))):
    _run(_train(offline, data, FLAGS.offline_steps), offline + ".log")
  total = FLAGS.offline_steps + FLAGS.online_steps

  control = os.path.join(root, "offline_more")
  if not os.path.isdir(os.path.join(control, "checkpoints", str(total))):
    shutil.rmtree(control, ignore_errors=True)
    shutil.copytree(offline, control)
    _run(_train(control, data, total), control + ".log")

  online = os.path.join(root, "online")
  actor_rows = []
  if not os.path.isdir(os.path.join(online, "checkpoints", str(total))):
    shutil.rmtree(online, ignore_errors=True)
    shutil.copytree(offline, online)
    port = _free_port()
    server = f"localhost:{port}"
    procs = []
    try:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "qsft_vla.replay.server", f"--config={CONFIG}", f"--port={port}"],
          cwd=REPO, env=ENV, stdout=open(online + ".server.log", "w"), stderr=subprocess.STDOUT))
      _run([sys.executable, "-m", "qsft_vla.replay.insert", f"--config={CONFIG}", f"--data={data}",
            f"--server={server}", "--timeout=120"], online + ".insert.log")
      for i in range(FLAGS.actors):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "qsft_vla.replay.actor", f"--workdir={online}",
             f"--env={FLAGS.env}", f"--server={server}", f"--seed={i + 1}", "--temperature=0",
             f"--epsilon={FLAGS.epsilon}"],
            cwd=REPO, env=ENV, stdout=open(f"{online}.actor{i + 1}.log", "w"),
            stderr=subprocess.STDOUT))
      _run(_train(online, data, total, "--config.data.source=reverb",
                  f"--config.data.reverb.server={server}", "--config.data.reverb.weight=0.5"),
           online + ".log")
    finally:
      _stop(procs)
  for path in sorted(glob.glob(os.path.join(online, "actors", "*", "metrics.jsonl"))):
    with open(path) as f:
      actor_rows += [json.loads(line) for line in f]

  results = {name: _evaluate(w) for name, w in (("offline", offline), ("offline_more", control),
                                                 ("online", online))}
  per = {k: [e["success"] for e in r["per_episode"]] for k, r in results.items()}
  lines = [
      "# Offline-to-online fine-tuning (BabyAI)", "",
      f"`benchmarks/offline_to_online.py --env={FLAGS.env} --episodes={FLAGS.episodes} "
      f"--offline_steps={FLAGS.offline_steps} --online_steps={FLAGS.online_steps} "
      f"--actors={FLAGS.actors} --epsilon={FLAGS.epsilon}`", "",
      f"Offline data: {FLAGS.episodes} episodes of `{FLAGS.behavior}`. Q-SFT "
      f"(`{CONFIG}`, seed {FLAGS.seed}) for {FLAGS.offline_steps} steps, then two "
      f"continuations of {FLAGS.online_steps} steps from that checkpoint: on the offline data "
      "alone, and with half of each batch sampled from a Reverb table that holds the offline "
      f"data plus the episodes of {FLAGS.actors} actors (the learner's newest checkpoint, "
      f"epsilon {FLAGS.epsilon}). Test stream seed {FLAGS.test_seed}, "
      f"{FLAGS.eval_episodes} episodes, each run's configured extraction and beta.", "",
      "| checkpoint | step | success | 95% interval |", "|---|---|---|---|"]
  for name, step in (("offline", FLAGS.offline_steps), ("offline_more", total),
                     ("online", total)):
    r = results[name]
    lines.append(f"| {name} | {step} | {100 * r['success_rate']:.0f}% | "
                 f"[{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] |")
  for a, b in (("online", "offline"), ("online", "offline_more")):
    t = outcomes.paired_sign_test(per[a], per[b])
    lines.append(f"\n{a} vs {b}: {t['a_only']} episodes only {a} solved, {t['b_only']} only "
                 f"{b}; exact McNemar p = {t['p_value']:.2g}.")
  if actor_rows:
    n = len(actor_rows)
    first = [r["success"] for r in actor_rows[: n // 2]]
    last = [r["success"] for r in actor_rows[n // 2:]]
    lines.append(f"\nActors: {n} episodes ({sum(r['length'] for r in actor_rows)} steps) "
                 f"inserted during the online continuation; their success (with exploration) "
                 f"{100 * sum(first) / max(1, len(first)):.0f}% in the first half, "
                 f"{100 * sum(last) / max(1, len(last)):.0f}% in the second.")
  report.emit("\n".join(lines) + "\n", FLAGS.out)
  return 0


if __name__ == "__main__":
  app.run(main)
