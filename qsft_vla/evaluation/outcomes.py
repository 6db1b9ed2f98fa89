"""Episode outcomes of an evaluation: Wilson interval, summary, comparison table, paired test.

TF-free and numpy-only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion (z=1.96: 95%).

  Unlike the normal ("Wald") interval it behaves at 0/n and n/n (it does not
  collapse to a point) and stays inside [0, 1]. n=0 gives (0, 1): nothing is known.
  Example: 8/10 -> (0.490, 0.943).
  """
  if isinstance(successes, bool) or isinstance(n, bool):
    raise TypeError("successes and n must be integers, not booleans")
  if int(successes) != successes or int(n) != n:
    raise ValueError(f"successes and n must be integers, got {successes!r}, {n!r}")
  successes, n = int(successes), int(n)
  if n < 0 or not 0 <= successes <= max(n, 0):
    raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
  if not z > 0:
    raise ValueError(f"z must be > 0, got {z}")
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  z2 = z * z
  denom = 1.0 + z2 / n
  center = (p + z2 / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
  low = 0.0 if successes == 0 else max(0.0, center - half)
  high = 1.0 if successes == n else min(1.0, center + half)
  return low, high


def auc(scores: Iterable[float], labels: Iterable[bool]) -> float | None:
  """The area under the ROC curve of `scores` for predicting `labels`: the chance
  that a random positive scores above a random negative, ties counting half
  (Mann-Whitney U / (n_pos * n_neg), from average ranks). None without both classes."""
  s = np.asarray(list(scores), np.float64)
  y = np.asarray(list(labels), bool)
  if s.shape != y.shape:
    raise ValueError(f"{s.size} scores for {y.size} labels")
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if not n_pos or not n_neg:
    return None
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s), np.float64)
  ranks[order] = np.arange(1, len(s) + 1)
  for value in np.unique(s):  # ties share their average rank
    tied = s == value
    ranks[tied] = ranks[tied].mean()
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
  return float(u / (n_pos * n_neg))


def summarize(episode_results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Aggregates per-episode results (each with "success", "return", "length").

  Returns success_rate, ci_low/ci_high (95% Wilson), episodes, successes,
  mean/std of return and length (population std). With no episodes the rate
  and means are NaN and the interval is (0, 1). Where every episode has the
  policy's own success estimates (Controller.act(return_info=True): at the first
  step, "success_estimate_first", and averaged over the episode,
  "success_estimate_mean"), also their means and how well they predict success:
  auc_first and auc_mean (None with only one outcome among the episodes).
  """
  results = list(episode_results)
  for i, r in enumerate(results):
    missing = {"success", "return", "length"} - set(r)
    if missing:
      raise KeyError(f"episode result {i} lacks {sorted(missing)}")
  n = len(results)
  successes = sum(bool(r["success"]) for r in results)
  returns = np.asarray([float(r["return"]) for r in results], np.float64)
  lengths = np.asarray([float(r["length"]) for r in results], np.float64)
  low, high = wilson_interval(successes, n)
  nan = float("nan")
  return {
      "success_rate": successes / n if n else nan,
      "ci_low": low,
      "ci_high": high,
      "episodes": n,
      "successes": successes,
      "mean_return": float(returns.mean()) if n else nan,
      "std_return": float(returns.std()) if n else nan,
      "mean_length": float(lengths.mean()) if n else nan,
      "std_length": float(lengths.std()) if n else nan,
      **_estimates(results),
  }


def _estimates(results) -> dict[str, Any]:
  keys = ("success_estimate_first", "success_estimate_mean")
  if not results or any(r.get(k) is None for r in results for k in keys):
    return {}
  success = [bool(r["success"]) for r in results]
  out = {}
  for k in keys:
    values = [float(r[k]) for r in results]
    out[f"mean_{k}"] = float(np.mean(values))
    out["auc_" + k.rsplit("_", 1)[1]] = auc(values, success)
  return out


def _fmt(x: float, spec: str) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """A plain-text table, one row per named summary (e.g. {"Q-SFT": s1, "BC": s2}).

  Columns: success rate with its 95% interval, successes/episodes, mean return
  and mean length (each +- std). Rows keep the mapping's order.
  """
  header = ("policy", "success", "95% CI", "succ/eps", "return", "length")
  body = []
  for name, s in rows.items():
    body.append((
        str(name),
        _fmt(s.get("success_rate"), ".1%"),
        f"[{_fmt(s.get('ci_low'), '.1%')}, {_fmt(s.get('ci_high'), '.1%')}]",
        f"{s.get('successes', '?')}/{s.get('episodes', '?')}",
        f"{_fmt(s.get('mean_return'), '.3f')} +- {_fmt(s.get('std_return'), '.3f')}",
        f"{_fmt(s.get('mean_length'), '.1f')} +- {_fmt(s.get('std_length'), '.1f')}",
    ))
  widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

  def line(r):
    # Name left-aligned, numbers right-aligned.
    cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]
    return "  ".join(cells).rstrip()

  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(header), sep, *(line(r) for r in body)])


def paired_sign_test(success_a: Iterable[bool], success_b: Iterable[bool]) -> dict[str, Any]:
  """Exact McNemar test for two policies run on the same episodes (paired seeds).

  Only discordant episodes carry information: a_only (A succeeded, B failed)
  and b_only. Under "no difference" a_only ~ Binomial(a_only + b_only, 1/2);
  p_value is the exact two-sided tail probability (1.0 without discordant pairs).
  """
  a = [bool(x) for x in success_a]
  b = [bool(x) for x in success_b]
  if len(a) != len(b):
    raise ValueError(f"paired results need equal lengths, got {len(a)} and {len(b)}")
  a_only = sum(x and not y for x, y in zip(a, b))
  b_only = sum(y and not x for x, y in zip(a, b))
  n = a_only + b_only
  k = min(a_only, b_only)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n if n else 0.5
  return {"pairs": len(a), "a_only": a_only, "b_only": b_only,
          "p_value": min(1.0, 2.0 * tail)}
