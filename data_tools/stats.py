"""Prints a dataset's statistics, computing and caching them beside it if needed.

  python -m data_tools.stats --data=DIR --config=robot_configs/<x>.py[:variant] [--recompute]

The cache is <DIR>/qsft_stats.json (qsft_vla.data.statistics); it is reused
while the dataset and the robot's key mapping are unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (CLI noise)

from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top


def format_stats(s: dict[str, Any]) -> str:
  lines = [f"episodes {s['num_episodes']}, steps {s['num_steps']}, length "
           f"min {s['episode_length']['min']} / mean {s['episode_length']['mean']:.1f} / "
           f"max {s['episode_length']['max']}",
           f"success rate {s['success_rate']:.3f}, terminal rate {s['terminal_rate']:.3f}"]
  per = s.get("per_behavior") or {}
  if len(per) > 1 or (per and "" not in per):
    for label, p in per.items():
      lines.append(f"  {label or '(unlabelled)'}: {p['episodes']} episodes "
                   f"({p['episodes'] / s['num_episodes']:.0%}), {p['steps']} steps "
                   f"({p['steps'] / s['num_steps']:.0%}), success rate {p['success_rate']:.3f}")
  r = s["reward"]
  lines.append(f"reward min {r['min']:.4g}, max {r['max']:.4g}, mean {r['mean']:.4g}"
               f"{' (sparse 0/1)' if r['is_sparse_binary'] else ''}")
  e = s["episode_return"]
  q = ", ".join(f"q{k}={v:.4g}" for k, v in e["quantiles"].items()
                if k in ("0.1", "0.25", "0.5", "0.75", "0.9"))
  lines.append(f"episode return min {e['min']:.4g}, max {e['max']:.4g}, mean {e['mean']:.4g}, "
               f"std {e['std']:.4g}; {q}")
  a = s["action"]
  cols = ("q01", "q99", "min", "max", "mean", "std")
  width = max(len(n) for n in a["names"] + ["action"])
  lines.append(f"{'action':<{width}}  " + "  ".join(f"{c:>10}" for c in cols))
  for j, n in enumerate(a["names"]):
    lines.append(f"{n:<{width}}  " + "  ".join(f"{a[c][j]:>10.4g}" for c in cols))
  if "state" in s:
    st = s["state"]
    lines.append(f"{'state':<{width}}  " + "  ".join(f"{c:>10}" for c in ("min", "max", "mean",
                                                                           "std")))
    for j in range(len(st["mean"])):
      lines.append(f"{'[' + str(j) + ']':<{width}}  " +
                   "  ".join(f"{st[c][j]:>10.4g}" for c in ("min", "max", "mean", "std")))
  return "\n".join(lines)


def _disagreement_line(data_dir: str) -> str:
  """The generator's greedy-behaviour disagreement estimate, when it made one."""
  from qsft_vla.data.rlds_writer import PROVENANCE_FILE  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(data_dir, PROVENANCE_FILE)) as f:
      d = json.load(f)["provenance"].get("greedy_behavior_disagreement")
  except (OSError, ValueError, KeyError, AttributeError):
    return ""
  if not d:
    return ""
  return (f"\ngreedy-behaviour disagreement {d['disagreement']:.3f} (data_tools.generate's "
          f"estimate on {d['states']} states of noise-free expert episodes: the share where "
          "the behaviour mixture's most likely action is not the expert's)")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data", None, "RLDS dataset directory.", required=True)
  flags.DEFINE_string("config", None, "Robot config: robot_configs/<x>.py[:variant].",
                      required=True)
  flags.DEFINE_string("split", "train", "Split.")
  flags.DEFINE_bool("recompute", False, "Ignore the cache and recompute.")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from data_tools import cli  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS

  def work():
    stats = statistics.load_or_compute(f.data, cli.load_robot(f.config), f.split,
                                       recompute=f.recompute)
    path = statistics.cache_path(f.data, f.split)
    cache = path if os.path.exists(path) else f"{path} (could not be written)"
    text = f"statistics of {f.data} (split {f.split}), cached at {cache}\n" + format_stats(stats)
    return text + _disagreement_line(f.data)

  return cli.run("stats", work)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
