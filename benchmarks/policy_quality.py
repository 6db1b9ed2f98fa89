"""Policy quality: Q-SFT vs BC vs filtered BC on data where imitation fails.

  .venv/bin/python benchmarks/policy_quality.py --size=small [--tasks=gotolocal,reach] \
      [--seeds=0,1,2] [--jobs=2] [--workdir=runs/policy_quality] [--results=benchmarks/results]

Sizes (SIZES): small, sized for about 2 hours on 2 cores with --jobs=2, one task per
simulator (GoToLocal, reach); medium, every task, hours per task on 2 cores (the
committed table); large, for accelerators.

For every task: generate the dataset with a behaviour mixture whose most
common behaviour is wrong (data_tools.generate --behavior), train every method
for every seed through the training binary (python -m qsft_vla.train: same
data, model, steps and training seed for all methods), and evaluate through
qsft_vla.evaluate on the same episodes for every method.

Streams of evaluation episodes (qsft_vla.evaluation.loop.eval_reset_seed):
  validation (--val_seed): Q-SFT's inference hyperparameters, the extraction
      ("p", "ratio" or "sample") and its beta, are chosen here, one choice per task
      (best mean success over the training seeds); the beta sweep plot is this
      stream.
  test (--test_seed): every method is reported here, Q-SFT with the choice
      made on validation only. Nothing is chosen on the test stream.
The expert ceiling (the scripted expert, noise-free) and the dataset's success
rate are reported beside them. Success vs training step comes from eval.every
during training (validation stream, the run's configured extraction and beta, which
the plot's legend names: not the choice made on validation).

Resumable: every finished piece (dataset, training run, evaluation JSON) is
kept under --workdir and skipped on the next run. Each task's summary goes to
<results>/policy_quality_<size>/<task>.json (committed, so that tasks run in
different sessions, or on different machines, make one table); the table
<results>/policy_quality_<size>.md and three PNG plots are rebuilt from every
task's summary there, the ones just run replacing their earlier versions.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import config as qconfig  # noqa: E402
from qsft_vla import evaluate as evaluate_lib  # noqa: E402
from qsft_vla.evaluation import loop, outcomes  # noqa: E402
from qsft_vla.learning import spec as learner_spec  # noqa: E402

METHODS = ("qsft", "bc", "filtered_bc")
NAMES = {"qsft": "Q-SFT", "bc": "BC", "filtered_bc": "filtered BC"}
# The validation sweep. It reaches 128: on Meta-World's 256 bins p_theta's
# probabilities are small, and the "p" extraction was still rising at 32
# (drawer-open at 1500 steps: 43% at 16, 69% at 32; two seeds at 64: 83%, 83%).
BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
EXTRACTIONS = ("p", "ratio", "sample")  # a task summary records the ones its choice saw


@dataclasses.dataclass(frozen=True)
class Task:
  env: str
  behavior: str           # the data's mixture: its most common behaviour is wrong
  # Training steps are the size's times this, for every method alike: a task the
  # model learns slowly (filtered BC's validation curve still climbing at the
  # size's last step) gets more, chosen on the validation stream.
  steps_factor: int = 1
  # The time limit of the data and of every evaluation, where the env's own is far above
  # what the task needs (None: the size's, or the env's).
  max_steps: int | None = None

  @property
  def robot(self) -> str:
    return "babyai" if self.env.startswith("babyai:") else "metaworld"


# Mixtures whose most common behaviour is a systematic mistake. BabyAI: 25% expert
# episodes, 75% the bot sent to the nearest other object. (An earlier mix had 15%
# uniformly random episodes: they run to the time limit, so they were 73% of the
# steps and 29% of them succeeded by luck after ~50 steps. Every method then spent
# most of each batch on random steps, and filtered BC kept the lucky ones; the data
# asked about luck, not about a systematic mistake.)
_BABYAI_MIX = "expert:0.25,distractor:0.75"
_MW_MIX = "expert:0.25,biased@8:0.6,random:0.15"
TASKS = {
    # GoToLocal at 2000 steps: filtered BC's and Q-SFT's validation curves were still
    # climbing (68 -> 75% and 71 -> 76% over steps 1500..2000, 3 seeds x 50 episodes).
    "gotolocal": Task("babyai:BabyAI-GoToLocal-v0", _BABYAI_MIX, steps_factor=2),
    # PickupLoc at 2000 steps: filtered BC's validation curve was still climbing
    # (27 -> 53% over 500..2000 steps) and Q-SFT had reached 25% (seed 0, argmax
    # p_theta); at 4000 steps, seed 0 on validation: Q-SFT 66%, see the table's note.
    "pickuploc": Task("babyai:BabyAI-PickupLoc-v0", _BABYAI_MIX, steps_factor=2),
    # OpenDoor (a door of the named colour on one of the room's walls): joined after the
    # robot configs' default extraction was chosen on the four tasks above, so it is a task
    # that choice never saw; 4000 steps as the other BabyAI tasks.
    # Its env's limit is 576 steps (GoToLocal's and PickupLoc's: 64), which let a failing
    # policy wander for minutes per evaluation; 64 as theirs, and as training's evaluation.
    "opendoor": Task("babyai:BabyAI-OpenDoor-v0", _BABYAI_MIX, steps_factor=2, max_steps=64),
    "reach": Task("metaworld:reach-v3", _MW_MIX),
    "push": Task("metaworld:push-v3", _MW_MIX),
    "pick_place": Task("metaworld:pick-place-v3", _MW_MIX),
    "drawer_open": Task("metaworld:drawer-open-v3", _MW_MIX),
}

# Per size: its tasks, and per robot: dataset episodes, training steps and batch,
# evaluation episodes per stream, the time limit of data and evaluation (None: the
# env's), the training-time evaluation interval and the validation sweep's extractions.
SIZES = {
    # small: the about-2-hour check on 2 cores (--jobs=2): one task per simulator,
    # three methods x three seeds, each trained to a success rate. GoToLocal at the
    # default job's size; reach at 1500 steps, where its methods separate (Q-SFT 59%,
    # BC 30%, filtered BC 70% on test in the medium size's first run). Meta-World
    # sweeps the configs' extraction only: an evaluation there runs up to 120 steps of
    # MuJoCo and the model per episode: push's sweep of three extractions (30 episodes,
    # 3 seeds) took about 1.8 hours by itself. Its Q-SFT is pi_head (qsft_modifier), at
    # about BC's cost: with separate networks a training of 1500 steps took 28 min
    # beside another, so reach alone ran past 2 hours.
    "small": {"tasks": ("gotolocal", "reach"),
              "babyai": dict(episodes=4000, steps=1000, batch=64, eval_episodes=100,
                             max_steps=None, every=500, extractions=EXTRACTIONS),
              "metaworld": dict(episodes=200, steps=1500, batch=32, eval_episodes=20,
                                max_steps=120, every=750, extractions=("sample",),
                                qsft_modifier="+pi_head")},
    # medium: every task, hours per task on 2 cores (gotolocal: 71 min, reach: 253
    # min; run a few tasks at a time with --tasks=...). The BabyAI cell is the default
    # job's size before steps_factor.
    "medium": {"tasks": tuple(TASKS),
               "babyai": dict(episodes=4000, steps=2000, batch=64, eval_episodes=100,
                              max_steps=None, every=500, extractions=EXTRACTIONS),
               # Meta-World at 1500 steps: on reach every method's validation curve
               # was still rising (filtered BC 51 -> 56%, Q-SFT 23 -> 27% over steps
               # 1000..1500; push: filtered BC 41 -> 44%); at 3000, training seed 0,
               # Q-SFT's best extraction went 37 -> 73% and filtered BC 60 -> 53%
               # (30 episodes). Runs of 1500 steps resume to 3000 (same batches).
               "metaworld": dict(episodes=200, steps=3000, batch=32, eval_episodes=30,
                                 max_steps=120, every=500, extractions=EXTRACTIONS)},
    "large": {"tasks": tuple(TASKS),
              "babyai": dict(episodes=8000, steps=20000, batch=128, eval_episodes=200,
                             max_steps=None, every=2000, extractions=EXTRACTIONS),
              "metaworld": dict(episodes=2000, steps=20000, batch=128, eval_episodes=100,
                                max_steps=200, every=2000, extractions=EXTRACTIONS)},
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "small", list(SIZES), "Dataset, training and evaluation sizes.")
flags.DEFINE_list("tasks", None, f"Tasks: {', '.join(TASKS)} (default: the size's); empty "
                  "(--tasks=): only rebuild the table and plots from the committed summaries.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed).")
flags.DEFINE_list("methods", list(METHODS), "Methods.")
flags.DEFINE_string("workdir", "runs/policy_quality", "Datasets, runs and evaluations (kept; "
                    "a rerun resumes).")
flags.DEFINE_string("results", "benchmarks/results", "Where the table and plots go.")
flags.DEFINE_integer("val_seed", 5000, "Validation stream (hyperparameters are chosen here).")
flags.DEFINE_integer("test_seed", 1000, "Test stream (reported; nothing is chosen here).")
flags.DEFINE_integer("jobs", 1, "Pieces run at once: training runs (a process each), then "
                     "evaluations (a process per run and extraction, its betas in turn, so one "
                     "compilation serves them). An evaluation is mostly one core stepping the "
                     "simulator: 2 on 2 cores.")
flags.DEFINE_multi_string("override", [], "Extra --config.* for every training run, "
                          "e.g. learner.mc_lower_bound=True.")


def _run(cmd: list[str], log: str) -> None:
  logging.info("%s done in %.0f s", " ".join(cmd[1:4]), report.run_binary(cmd, log))


def dataset(name: str, task: Task, size: dict[str, Any]) -> str:
  out = os.path.join(FLAGS.workdir, FLAGS.size, name, "data")
  if not os.path.exists(os.path.join(out, "dataset_info.json")):
    cmd = [sys.executable, "-m", "data_tools.generate", f"--env={task.env}",
           f"--episodes={size['episodes']}", f"--behavior={task.behavior}", "--seed=0",
           f"--out={out}"]
    if size["max_steps"]:
      cmd.append(f"--max_steps={size['max_steps']}")
    _run(cmd, out + ".log")
  return out


def train(name: str, task: Task, size: dict[str, Any], method: str, seed: int, data: str) -> str:
  workdir = os.path.join(FLAGS.workdir, FLAGS.size, name, method, f"seed{seed}")
  final = os.path.join(workdir, "checkpoints", str(size["steps"]))
  if os.path.exists(final):
    return workdir
  overrides = [f"--config.data.dir={data}", f"--config.seed={seed}",
               f"--config.train.num_steps={size['steps']}",
               f"--config.train.batch_size={size['batch']}",
               f"--config.train.checkpoint_every={size['every']}",
               f"--config.eval.env={task.env}", f"--config.eval.every={size['every']}",
               f"--config.eval.episodes={min(50, size['eval_episodes'])}",
               f"--config.eval.seed={FLAGS.val_seed}", "--config.eval.video_episodes=0"]
  if size["max_steps"]:
    overrides.append(f"--config.eval.max_steps={size['max_steps']}")
  overrides += [f"--config.{o}" for o in FLAGS.override]
  _run([sys.executable, "-m", "qsft_vla.train",
        f"--config=robot_configs/{task.robot}.py:{method}"
        + (size.get("qsft_modifier", "") if method == "qsft" else ""), f"--workdir={workdir}",
        *overrides], workdir + ".log")
  return workdir


def evaluate(workdir: str, task: Task, size: dict[str, Any], seed: int,
             extraction: str | None = None, beta: float | None = None) -> dict[str, Any]:
  """qsft_vla.evaluate on one stream, cached by its output file."""
  stem = evaluate_lib.output_stem(task.env, seed, beta, extraction)
  path = os.path.join(workdir, "eval", stem + ".json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    # A file of an earlier checkpoint (a run since trained further) is evaluated
    # again; so are "sample" files written before sample_proposal existed (they drew
    # from pi alone and recorded no sampling) under the run's proposal.
    fresh = cached.get("checkpoint_step") == size["steps"]
    if fresh and (extraction != "sample" or (cached.get("sampling") or {}).get(
        "sample_proposal", "pi") == _run_learner(workdir).sample_proposal):
      return cached
  return evaluate_lib.run(workdir, env=task.env, episodes=size["eval_episodes"], seed=seed,
                          beta=beta, extraction=extraction, video_episodes=0,
                          max_steps=size["max_steps"], progress=False)


def _run_learner(workdir: str) -> learner_spec.LearnerConfig:
  """The learner config a training run recorded (later fields at their defaults)."""
  with open(os.path.join(workdir, "config.json")) as f:
    return learner_spec.LearnerConfig.from_dict(json.load(f)["learner"])


def expert_ceiling(task: Task, size: dict[str, Any]) -> dict[str, Any]:
  path = os.path.join(FLAGS.workdir, FLAGS.size, f"expert-{task.env.replace(':', '_')}-"
                      f"seed{FLAGS.test_seed}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  summary, per_episode = loop.evaluate(task.env, loop.ExpertPolicy(), size["eval_episodes"],
                                       FLAGS.test_seed, max_steps=size["max_steps"],
                                       progress=False)
  out = {**summary, "per_episode": per_episode}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f)
  return out


def pooled(results: list[dict[str, Any]]) -> dict[str, float]:
  """Success over seeds x episodes with its Wilson 95% interval."""
  succ = [e["success"] for r in results for e in r["per_episode"]]
  lo, hi = outcomes.wilson_interval(int(sum(succ)), len(succ))
  return {"mean": float(np.mean(succ)), "lo": lo, "hi": hi, "n": len(succ)}


def choose(sweep: dict[str, dict[float, float]]) -> tuple[str, float]:
  """(extraction, beta) of the best validation success in {extraction: {beta: success}};
  ties go to the paper's extraction "p", then to the smaller beta. Successes are means
  of counts: equal ones may differ in the last bit by the order of summation, so they
  are compared rounded."""
  return max(((e, b) for e, by_beta in sweep.items() for b in by_beta),
             key=lambda eb: (round(sweep[eb[0]][eb[1]], 9), eb[0] == "p", -eb[1]))


def default_choice(task: Task) -> tuple[str, float]:
  """The (extraction, beta) Q-SFT acts with under the robot config's defaults."""
  lc = qconfig.load_config_file(os.path.join(REPO, "robot_configs", f"{task.robot}.py:qsft")).learner
  return lc.extraction, float(lc.beta if lc.extraction == "p" else lc.ratio_beta)


def one_choice(results: list[dict[str, Any]]) -> list[str]:
  """One (extraction, beta) for every task, chosen on validation: the best mean over
  the tasks' sweeps (over the cells every task has; ties as in `choose`), and, for
  each task, the choice made on the other tasks read on the one left out: what a
  fixed default is worth on a task it was not chosen on."""
  sweeps = {r["task"]: {e: {float(b): v for b, v in s.items()}
                        for e, s in r["beta_sweep_val"].items()}
            for r in results if "beta_sweep_val" in r}
  if len(sweeps) < 2:
    return []
  cells = set.intersection(*({(e, b) for e, s in sw.items() for b in s}
                             for sw in sweeps.values()))

  def best(tasks):
    mean = {}
    for e, b in cells:
      mean.setdefault(e, {})[b] = float(np.mean([sweeps[t][e][b] for t in tasks]))
    c = choose(mean)
    return c, mean[c[0]][c[1]]
  (e, b), v = best(list(sweeps))
  lines = ["", f"One choice for every task (validation stream): {e}, beta {b:g} has the best "
           f"mean over the {len(sweeps)} tasks' sweeps ({100 * v:.0f}%). Chosen on the other "
           "tasks, read on the one left out:", "",
           "| left out | chosen on the others | its validation | the task's own choice |",
           "|---|---|---|---|"]
  for r in results:
    if r["task"] not in sweeps:
      continue
    (e, b), _ = best([x for x in sweeps if x != r["task"]])
    own = r["qsft_choice"]
    lines.append(f"| {r['task']} | {e}, beta {b:g} | {100 * sweeps[r['task']][e][b]:.0f}% | "
                 f"{own['extraction']}, beta {own['beta']:g} ({100 * own['val_success']:.0f}%) |")
  tested = [r for r in results if r.get("qsft_default")]
  if tested:
    lines += ["", "Q-SFT at the robot config's default (no per-task choice), test stream: "
              + "; ".join(f"{r['task']} {100 * r['qsft_default']['test']['mean']:.1f}% "
                          f"({r['qsft_default']['extraction']}, beta "
                          f"{r['qsft_default']['beta']:g})" for r in tested)]
  return lines


def run_architecture(workdir: str) -> str:
  """The learner architecture a training run used (its config.json)."""
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)["learner"]["architecture"]


def task_size(task: Task) -> dict[str, Any]:
  """The size's settings for the task's robot, its training steps scaled."""
  size = dict(SIZES[FLAGS.size][task.robot])
  size["steps"] *= task.steps_factor
  if task.max_steps:
    size["max_steps"] = task.max_steps
  return size


def _eval_group(workdir: str, task: Task, size: dict[str, Any], seed: int,
                extraction: str | None, betas: tuple) -> None:
  """One worker's piece: a run's evaluations on one stream, one extraction, its betas in turn."""
  for b in betas:
    evaluate(workdir, task, size, seed, extraction, b)


def _prefetch(task: Task, size: dict[str, Any], groups: list[tuple]) -> None:
  """Runs evaluation groups (workdir, seed, extraction, betas) FLAGS.jobs at a time, each
  in its own process; their JSON files are the cache `evaluate` then reads. A no-op
  with jobs = 1 (the callers evaluate in turn)."""
  if FLAGS.jobs <= 1 or len(groups) <= 1:
    return
  # The "sample" groups first: the slowest, so the last ones to start are short.
  groups = sorted(groups, key=lambda g: g[2] != "sample")
  # spawn: a forked child would inherit jax's threads in whatever state they were.
  with concurrent.futures.ProcessPoolExecutor(
      FLAGS.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
    for f in [pool.submit(_eval_group, w, task, size, seed, e, tuple(betas))
              for w, seed, e, betas in groups]:
      f.result()  # a failed evaluation fails the run, with its error


def run_task(name: str, seeds: list[int]) -> dict[str, Any]:
  task = TASKS[name]
  size = task_size(task)
  data = dataset(name, task, size)
  with open(os.path.join(data, "qsft_stats.json")) as f:
    data_stats = json.load(f)
  cells = [(m, s) for m in FLAGS.methods for s in seeds]
  with concurrent.futures.ThreadPoolExecutor(max(1, FLAGS.jobs)) as pool:  # each a process
    workdirs = list(pool.map(lambda c: train(name, task, size, c[0], c[1], data), cells))
  runs = {m: [w for (mm, _), w in zip(cells, workdirs) if mm == m] for m in FLAGS.methods}
  _prefetch(task, size, [(w, FLAGS.val_seed, e, BETAS) for w in runs.get("qsft", [])
                         for e in size["extractions"]]
            + [(w, FLAGS.test_seed, None, (None,)) for m, ws in runs.items() if m != "qsft"
               for w in ws])

  out: dict[str, Any] = {"task": name, "env": task.env, "behavior": task.behavior,
                         "data_success": data_stats["success_rate"],
                         "data_episodes": data_stats["num_episodes"],
                         "steps": size["steps"], "batch": size["batch"],
                         "expert": pooled([expert_ceiling(task, size)]), "methods": {}}
  if "qsft" in runs:
    out["architecture"] = run_architecture(runs["qsft"][0])
  sweep: dict[str, dict[float, float]] = {}
  choice = None
  if "qsft" in runs:
    for extraction in size["extractions"]:
      sweep[extraction] = {
          b: float(np.mean([evaluate(w, task, size, FLAGS.val_seed, extraction, b)
                            ["success_rate"] for w in runs["qsft"]])) for b in BETAS}
    choice = choose(sweep)
    _prefetch(task, size, [(w, FLAGS.test_seed, e, (b,)) for w in runs["qsft"]
                           for e, b in {choice, default_choice(task)}])
    out["qsft_choice"] = {"extraction": choice[0], "beta": choice[1],
                          "val_success": sweep[choice[0]][choice[1]]}
    out["beta_sweep_val"] = sweep
    out["extractions_val"] = list(size["extractions"])
  for m, workdirs in runs.items():
    if m == "qsft":
      test = [evaluate(w, task, size, FLAGS.test_seed, choice[0], choice[1]) for w in workdirs]
    else:
      test = [evaluate(w, task, size, FLAGS.test_seed) for w in workdirs]
    out["methods"][m] = {"test": pooled(test),
                         "per_seed": [r["success_rate"] for r in test],
                         "curve": _curve(workdirs)}
    if m == "qsft":  # training evaluates the run's configured policy, not the validation choice
      lc = _run_learner(workdirs[0])
      out["methods"][m]["curve_policy"] = {"extraction": lc.extraction,
                                           "beta": lc.inference_beta}
  if "qsft" in runs:  # what a user gets with no per-task choice (cached when it is the choice)
    default = default_choice(task)
    out["qsft_default"] = {"extraction": default[0], "beta": default[1],
                           "val_success": sweep.get(default[0], {}).get(default[1]),
                           "test": pooled([evaluate(w, task, size, FLAGS.test_seed, *default)
                                           for w in runs["qsft"]])}
  for base in ("bc", "filtered_bc"):
    if "qsft" in runs and base in runs:
      # Paired over the same (seed, episode) pairs of the test stream.
      a = [e["success"] for w in runs["qsft"]
           for e in evaluate(w, task, size, FLAGS.test_seed, *choice)["per_episode"]]
      b = [e["success"] for w in runs[base]
           for e in evaluate(w, task, size, FLAGS.test_seed)["per_episode"]]
      out[f"qsft_vs_{base}"] = outcomes.paired_sign_test(a, b)
  return out


def _curve(workdirs: list[str]) -> dict[int, float]:
  """Mean eval/success_rate per step over the seeds (eval.every during training)."""
  by_step: dict[int, list[float]] = {}
  for w in workdirs:
    with open(os.path.join(w, "metrics.jsonl")) as f:
      for line in f:
        row = json.loads(line)
        if "eval/success_rate" in row:
          by_step.setdefault(int(row["step"]), []).append(row["eval/success_rate"])
  return {s: float(np.mean(v)) for s, v in sorted(by_step.items())}


def table(results: list[dict[str, Any]]) -> str:
  cols = [m for m in METHODS if any(m in r["methods"] for r in results)]
  lines = [f"# Policy quality ({FLAGS.size}): test stream seed {FLAGS.test_seed}, "
           f"Q-SFT's extraction and beta chosen on validation stream seed {FLAGS.val_seed}",
           "", "Success over training seeds x test episodes with Wilson 95% intervals; one "
           "summary per task in `policy_quality_" + FLAGS.size + "/<task>.json`.", "",
           "| task | seeds | steps x batch | data (success) | expert | "
           + " | ".join(NAMES[m] for m in cols) + " | Q-SFT networks | Q-SFT choice (val) "
           "| Q-SFT vs BC | Q-SFT vs filtered BC |",
           "|---|---|---|---|---|" + "---|" * len(cols) + "---|---|---|---|"]

  def cell(p):
    return f"{100 * p['mean']:.1f}% [{100 * p['lo']:.0f}, {100 * p['hi']:.0f}]" if p else "-"
  for r in results:
    row = [r["task"], ",".join(str(s) for s in r.get("seeds", [])), _steps(r),
           f"{r['behavior']} ({100 * r['data_success']:.0f}%)", cell(r["expert"])]
    row += [cell(r["methods"].get(m, {}).get("test")) for m in cols]
    c = r.get("qsft_choice")
    # Summaries written before the field was recorded all come from separate networks.
    row.append(r.get("architecture", "separate") if "qsft" in r["methods"] else "")
    row.append(f"{c['extraction']}, beta {c['beta']:g} ({100 * c['val_success']:.0f}%)"
               if c else "")
    for base in ("bc", "filtered_bc"):  # discordant pairs: Q-SFT only vs the baseline only
      t = r.get(f"qsft_vs_{base}")
      row.append(f"{t['a_only']} vs {t['b_only']}, p = {t['p_value']:.2g}" if t else "")
    lines.append("| " + " | ".join(row) + " |")
  full = [r for r in results if all(m in r["methods"] for m in cols)]
  if full:
    mean = {m: np.mean([r["methods"][m]["test"]["mean"] for r in full]) for m in cols}
    ratio = [r["methods"]["qsft"]["test"]["mean"] / r["expert"]["mean"] for r in full
             if "qsft" in r["methods"] and r["expert"]["mean"] > 0]
    lines += ["", f"Average over {len(full)} task(s): " + ", ".join(
        f"{NAMES[m]} {100 * v:.1f}%" for m, v in mean.items())
              + (f"; Q-SFT at >= 90% of the expert on {sum(x >= 0.9 for x in ratio)} of "
                 f"{len(ratio)}" if ratio else "")]
  lines += one_choice(results)
  notes = [f"- {r['task']}: {r['note']}" for r in results if r.get("note")]
  if notes:
    lines += ["", *notes]
  return "\n".join(lines) + "\n"


def _steps(result: dict[str, Any]) -> str:
  """"steps x batch" of a summary (older ones, without them, ran at their size's)."""
  size = SIZES[FLAGS.size][TASKS[result["task"]].robot]
  return f"{result.get('steps', size['steps'])} x {result.get('batch', size['batch'])}"


def plots(results: list[dict[str, Any]], prefix: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  cols = [m for m in METHODS if any(m in r["methods"] for r in results)]
  fig, ax = plt.subplots(figsize=(max(5.5, 1.8 * len(results) + 2), 3.5))  # room for the title
  width = 0.8 / (len(cols) + 1)
  for k, m in enumerate(cols + ["expert"]):
    ps = [r["expert"] if m == "expert" else r["methods"].get(m, {}).get("test")
          or {"mean": 0.0, "lo": 0.0, "hi": 0.0} for r in results]
    x = np.arange(len(results)) + k * width
    mean = np.array([p["mean"] for p in ps])
    err = np.array([[p["mean"] - p["lo"] for p in ps], [p["hi"] - p["mean"] for p in ps]])
    ax.bar(x, mean, width, yerr=err, capsize=3, label=NAMES.get(m, "expert"))
  ax.set_xticks(np.arange(len(results)) + width * len(cols) / 2)
  ax.set_xticklabels([r["task"] for r in results])
  ax.set_ylabel("test success")
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=8)
  ax.set_title("Success per task (95% intervals over seeds x episodes)")
  paths.append(prefix + "_success.png")
  fig.tight_layout()
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  with_sweep = [r for r in results if "beta_sweep_val" in r]
  if with_sweep:
    fig, axes = plt.subplots(1, len(with_sweep), figsize=(3.2 * len(with_sweep), 3),
                             squeeze=False)
    for ax, r in zip(axes[0], with_sweep):
      betas = sorted({float(b) for s in r["beta_sweep_val"].values() for b in s})
      for e, s in r["beta_sweep_val"].items():  # a summary made with a shorter sweep draws its own
        ax.plot(range(len(betas)), [_get(s, b) for b in betas], "o-", label=f"Q-SFT {e}")
      ax.set_xticks(range(len(betas)))
      ax.set_xticklabels([f"{b:g}" for b in betas], fontsize=7)
      _panel(ax, r["task"], "beta")
    _finish(plt, fig, axes, prefix + "_beta.png", paths)

  with_curves = [r for r in results if any(r["methods"].get(m, {}).get("curve") for m in cols)]
  fig, axes = plt.subplots(1, max(1, len(with_curves)), figsize=(3.2 * max(1, len(with_curves)), 3),
                           squeeze=False)
  for ax, r in zip(axes[0], with_curves):
    for m in cols:
      c = r["methods"].get(m, {}).get("curve") or {}
      steps = sorted(int(s) for s in c)
      ax.plot(steps, [_get(c, s) for s in steps], "o-", label=curve_label(r, m))
    _panel(ax, r["task"], "training step")
  _finish(plt, fig, axes, prefix + "_steps.png", paths)
  return paths


def curve_label(result: dict[str, Any], method: str) -> str:
  """The legend of a method's training curve: Q-SFT's names the policy training evaluated."""
  cp = result["methods"].get(method, {}).get("curve_policy")
  return f"{NAMES[method]} ({cp['extraction']}, beta {cp['beta']:g})" if cp else NAMES[method]


def _get(d, key):
  """d[key] for a number key, also after a JSON round trip (keys become strings)."""
  return d[key] if key in d else d[str(key)]


def _panel(ax, title, xlabel):
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylim(0, 1.05)


def _finish(plt, fig, axes, path, paths):
  axes[0][0].set_ylabel("validation success")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)


def task_summaries(folder: str) -> list[dict[str, Any]]:
  """Every task's committed summary in `folder`, in the order of TASKS."""
  found = {}
  if os.path.isdir(folder):
    for name in os.listdir(folder):
      if name.endswith(".json") and name[:-5] in TASKS:
        with open(os.path.join(folder, name)) as f:
          found[name[:-5]] = json.load(f)
  return [found[t] for t in TASKS if t in found]


def write_summary(folder: str, result: dict[str, Any]) -> None:
  """One task's summary, written whole (a temporary file renamed over the old one)."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, result["task"] + ".json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)


def _earlier_wall_min(folder: str, task: str) -> float:
  """The wall time an earlier run recorded in the task's summary (0 if none)."""
  path = os.path.join(folder, task + ".json")
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return float(json.load(f).get("wall_min", 0.0))


def rebuild(prefix: str, run_seconds: float | None = None) -> str:
  """Writes <prefix>.md and the plots from every task summary under <prefix>/."""
  results = task_summaries(prefix)
  walls = ", ".join(f"{r['task']} {r['wall_min']:.0f}" for r in results if "wall_min" in r)
  run = "" if run_seconds is None else f"Wall time of this run: {run_seconds / 60:.0f} min. "
  text = table(results) + f"\n{run}Wall time per task, over the runs that built it (min): {walls}.\n"
  with open(prefix + ".md", "w") as f:
    f.write(text)
  plots(results, prefix)
  return text


def main(argv):
  del argv
  tasks = list(SIZES[FLAGS.size]["tasks"]) if FLAGS.tasks is None else FLAGS.tasks
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise app.UsageError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
  bad = [m for m in FLAGS.methods if m not in METHODS]
  if bad:
    raise app.UsageError(f"unknown methods {bad}; known: {', '.join(METHODS)}")
  seeds = [int(s) for s in FLAGS.seeds]
  start = time.time()
  prefix = os.path.join(FLAGS.results, f"policy_quality_{FLAGS.size}")
  for name in tasks:
    logging.info("task %s (%s)", name, TASKS[name].env)
    t0 = time.time()
    result = run_task(name, seeds)
    result["seeds"] = seeds
    # Summed over the runs that built the task (a resumed run's cached pieces cost nothing).
    result["wall_min"] = round(_earlier_wall_min(prefix, name) + (time.time() - t0) / 60, 1)
    write_summary(prefix, result)
    print(rebuild(prefix, time.time() - start))
  if not tasks:  # --tasks= : the table and plots from the committed summaries alone
    print(rebuild(prefix))
  return 0


if __name__ == "__main__":
  app.run(main)
