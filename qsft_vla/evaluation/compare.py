"""Side-by-side table of evaluation results (the JSON files qsft_vla.evaluate writes).

  python -m qsft_vla.evaluation.compare [--out=table.md] Q-SFT=runs/a/eval/X-seed0.json \
      BC=runs/b/eval/X-seed0.json

Prints success rate with its 95% Wilson interval, successes/episodes, return
and length per policy, what was evaluated (env, seed, episodes, checkpoint
step, beta), and, since evaluate() runs every policy on the same episodes,
an exact paired test of the first policy against each other one. TF-free.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app, flags

from qsft_vla.evaluation import outcomes


def load(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read evaluation result {path}: {e}") from e
  for key in ("success_rate", "ci_low", "ci_high", "episodes", "per_episode", "env", "seed"):
    if key not in result:
      raise ValueError(f"{path}: not an evaluation result (no {key!r})")
  return result


def _nan(x):
  return float("nan") if x is None else x


def compare(named: Sequence[tuple[str, dict[str, Any]]]) -> str:
  """The report for [(name, result)], first one the reference of the paired tests."""
  rows = {name: {k: _nan(v) for k, v in r.items()} for name, r in named}
  lines = [outcomes.format_table(rows), ""]
  for name, r in named:
    beta = r.get("beta")
    lines.append(f"{name}: {r['env']}, eval seed {r['seed']}, {r['episodes']} episodes, "
                 f"checkpoint step {r.get('checkpoint_step', '?')}, algorithm "
                 f"{r.get('algorithm', '?')}" + ("" if beta is None else f", beta {beta:g}"))
  ref_name, ref = named[0]
  for name, r in named[1:]:
    seeds_a = [e["reset_seed"] for e in ref["per_episode"]]
    seeds_b = [e["reset_seed"] for e in r["per_episode"]]
    if r["env"] != ref["env"] or seeds_a != seeds_b:
      lines.append(f"{ref_name} vs {name}: different episodes (env or seeds); no paired test")
      continue
    t = outcomes.paired_sign_test([e["success"] for e in ref["per_episode"]],
                               [e["success"] for e in r["per_episode"]])
    lines.append(f"{ref_name} vs {name} on the same {t['pairs']} episodes: {ref_name} alone "
                 f"succeeded in {t['a_only']}, {name} alone in {t['b_only']}; exact McNemar "
                 f"p = {t['p_value']:.3g}")
  return "\n".join(lines)


_OUT = flags.DEFINE_string("out", None, "also write the report here (markdown code block)")


def main(argv):
  args = argv[1:]
  if not args:
    raise app.UsageError("give NAME=path/to/result.json for each policy")
  named = []
  for arg in args:
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
      raise app.UsageError(f"expected NAME=path/to/result.json, got {arg!r}")
    try:
      named.append((name, load(path)))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  report = compare(named)
  print(report)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write("```\n" + report + "\n```\n")


if __name__ == "__main__":
  app.run(main)
