"""Behaviour policies that collect simulated offline data, and their mixtures.

A mixture is written `NAME[@PARAM]:WEIGHT,...`, e.g.
`expert:0.25,distractor:0.6,random:0.15`. Every episode is rolled out by one
behaviour; `assign` splits the episodes by weight (largest remainder) and
shuffles the labels with the dataset seed, so the split is exact and
deterministic. Episode metadata records the label ("noisy@0.5").

Generic behaviours (any simulator, through SimEnv.expert_action / random_action):
  expert      the scripted expert, no noise
  noisy@P     the expert with noise P (BabyAI: probability of a uniformly
              random action; Meta-World: std of Gaussian action noise)
  random      uniformly random actions
  quitter@F   the expert for the first u * max_steps steps, u ~ U(0, F) per
              episode, then uniformly random actions (F in (0, 1])
Systematic behaviours, whose mistakes are consistent (SimEnv.systematic):
  distractor  BabyAI: the bot on the same kind of mission for the nearest
              other object (another door for Open*)
  biased@CM   Meta-World: the scripted policy aimed at object and goal
              positions displaced by CM centimetres

A behaviour that has finished its own (wrong) goal ends its episode there,
truncated (SimEnv.systematic_done): idling to the time limit would make most of
the dataset's steps no-ops (DESIGN.md, "behaviour mixtures"). TF-free.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from qsft_vla.envs.base import Observation, SimEnv

GENERIC = {"expert": False, "noisy": True, "random": False, "quitter": True}  # name -> has PARAM


@dataclasses.dataclass(frozen=True)
class Behavior:
  """One behaviour of a mixture: name, optional parameter, mixture weight."""
  name: str
  param: float | None = None
  weight: float = 1.0

  @property
  def label(self) -> str:
    """NAME or NAME@PARAM, as recorded in episode metadata."""
    return self.name if self.param is None else f"{self.name}@{self.param:g}"

  @property
  def noise(self) -> float:
    """The metadata's legacy `noise` field: the noise level, -1 when it has none."""
    if self.name == "expert":
      return 0.0
    return float(self.param) if self.name == "noisy" else -1.0


def parse(text: str, env_id: str, systematic: dict[str, bool]) -> list[Behavior]:
  """`NAME[@PARAM]:WEIGHT,...` -> behaviours; ValueError naming the bad entry.

  `systematic` is the simulator's own {name: takes a parameter}
  (SimEnv.SYSTEMATIC); `env_id` names it in errors.
  """
  known = {**GENERIC, **systematic}
  out, seen = [], set()
  entries = [e.strip() for e in str(text).split(",") if e.strip()]
  if not entries:
    raise ValueError("--behavior must list at least one NAME[@PARAM]:WEIGHT")
  for entry in entries:
    spec, sep, weight_text = entry.rpartition(":")
    if not sep:
      spec, weight_text = entry, "1"
    name, at, param_text = spec.partition("@")
    if name not in known:
      raise ValueError(f"--behavior entry {entry!r}: unknown behaviour {name!r} for {env_id}; "
                       f"known: {', '.join(sorted(known))}")
    try:
      weight = float(weight_text)
    except ValueError:
      raise ValueError(f"--behavior entry {entry!r}: weight {weight_text!r} is not a number") \
          from None
    if not (math.isfinite(weight) and weight >= 0):
      raise ValueError(f"--behavior entry {entry!r}: weight must be a finite number >= 0")
    param = None
    if known[name]:
      if not at:
        raise ValueError(f"--behavior entry {entry!r}: {name} needs a parameter ({name}@X)")
      try:
        param = float(param_text)
      except ValueError:
        raise ValueError(f"--behavior entry {entry!r}: parameter {param_text!r} is not a "
                         "number") from None
      _check_param(entry, name, param, env_id)
    elif at:
      raise ValueError(f"--behavior entry {entry!r}: {name} takes no parameter")
    b = Behavior(name, param, weight)
    if b.label in seen:
      raise ValueError(f"--behavior lists {b.label!r} twice")
    seen.add(b.label)
    out.append(b)
  if sum(b.weight for b in out) <= 0:
    raise ValueError(f"--behavior weights must have a positive sum, got {text!r}")
  return out


def _check_param(entry: str, name: str, param: float, env_id: str) -> None:
  if not math.isfinite(param):
    raise ValueError(f"--behavior entry {entry!r}: the parameter must be finite")
  if name == "quitter" and not 0.0 < param <= 1.0:
    raise ValueError(f"--behavior entry {entry!r}: quitter@F needs F in (0, 1] (a fraction "
                     "of the time limit)")
  if name == "noisy":
    if param < 0:
      raise ValueError(f"--behavior entry {entry!r}: noise must be >= 0")
    if env_id.startswith("babyai:") and param > 1:
      raise ValueError(f"--behavior entry {entry!r}: BabyAI noise is a probability in [0, 1]")
  if name == "biased" and param <= 0:
    raise ValueError(f"--behavior entry {entry!r}: biased@CM needs an offset > 0 cm")


def from_noise_levels(levels: Sequence[float]) -> list[Behavior]:
  """The legacy `--noise=a,b,c`: noisy@a, noisy@b, ... with equal weights (0 is the expert)."""
  out = []
  for x in levels:
    b = Behavior("expert", None, 1.0) if float(x) == 0 else Behavior("noisy", float(x), 1.0)
    if b not in out:
      out.append(b)
  return out


def assign(behaviors: Sequence[Behavior], episodes: int, seed: int) -> list[Behavior]:
  """The behaviour of each episode: counts proportional to the weights (largest
  remainder, ties to the earlier entry), order shuffled by `seed`."""
  w = np.asarray([b.weight for b in behaviors], np.float64)
  exact = w / w.sum() * episodes
  counts = np.floor(exact).astype(int)
  order = sorted(range(len(behaviors)), key=lambda i: (-(exact[i] - counts[i]), i))
  for i in order[:episodes - counts.sum()]:
    counts[i] += 1
  labels = np.repeat(np.arange(len(behaviors)), counts)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6265686176]))  # "behav"
  return [behaviors[i] for i in rng.permutation(labels)]


class EpisodeActor:
  """Acts for one episode as `behavior`; `done` says it has finished its own goal.

  Call `start()` right after env.reset(seed), then `act(obs)` every step and
  `done()` after every env.step.
  """

  def __init__(self, env: SimEnv, behavior: Behavior, rng: np.random.Generator):
    self.env, self.behavior, self.rng = env, behavior, rng
    self._t = 0
    self._quit_at = None

  def start(self) -> None:
    b = self.behavior
    if b.name == "quitter":
      self._quit_at = int(self.rng.uniform(0.0, b.param) * self.env.max_steps)
    elif b.name not in GENERIC:
      self.env.start_systematic(b.name, b.param, self.rng)

  def act(self, obs: Observation) -> np.ndarray:
    del obs  # the simulator's own state drives the scripted behaviours
    b, t = self.behavior, self._t
    self._t += 1
    if b.name == "random" or (b.name == "quitter" and t >= self._quit_at):
      return self.env.random_action(self.rng)
    if b.name == "noisy":
      return self.env.expert_action(self.rng, b.param)
    return self.env.expert_action(self.rng, 0.0)  # expert, quitter before it quits, systematic

  def done(self) -> bool:
    return self.behavior.name not in GENERIC and self.env.systematic_done()


def greedy_disagreement(env: SimEnv, mixture: Sequence[Behavior], episodes: int, seed: int,
                        bins: Sequence[int]) -> dict[str, float]:
  """How often the mixture's most likely action is not the expert's, on expert states.

  Estimate: roll out `episodes` noise-free expert episodes (their own seed
  stream) and at every state give each behaviour's action distribution its
  mixture weight (episode shares; how often each behaviour would visit that
  state is ignored), per action dimension over `bins` (the tokenizer's bins:
  discrete ids, or equal-width bins of [-1, 1] for continuous dimensions):
    expert                  all its weight on the expert's bin
    noisy@P                 discrete: 1 - P on the expert's bin, P spread evenly;
                            continuous: the Gaussian's mass in the expert's bin,
                            the rest (spread) never outvotes a point mass
    random                  spread evenly
    quitter@F at step t     the expert until it quits, P(quit by t) = min(1, t / (F T)),
                            then spread evenly
    systematic              all its weight on its own action's bin (SimEnv.systematic_probe)
  A state disagrees when, in any dimension, the bin with the most weight is not
  the expert's. Returns {"disagreement", "states", "systematic_differs"}: the
  share of disagreeing states, how many states, and how often a systematic
  behaviour's own action differs from the expert's.
  """
  bins = np.asarray(bins)
  weights = np.asarray([b.weight for b in mixture], np.float64)
  weights = weights / weights.sum()
  continuous = env.robot_config.endswith("metaworld.py")
  states = disagree = differs = systematic_states = 0
  for index in range(episodes):
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x67726565]))  # "gree"
    env.reset(int(rng.integers(2**31)))
    for t in range(env.max_steps):
      expert = np.asarray(env.expert_action(rng, 0.0), np.float64)
      e_bin = _to_bins(expert, bins, continuous)
      votes = np.zeros((len(bins), int(bins.max())))
      for b, w in zip(mixture, weights):
        spread = w / bins
        if b.name == "expert":
          votes[np.arange(len(bins)), e_bin] += w
        elif b.name == "random":
          votes += spread[:, None] * (np.arange(votes.shape[1]) < bins[:, None])
        elif b.name in ("noisy", "quitter"):
          if b.name == "noisy":
            keep = _gaussian_bin_mass(b.param, bins) if continuous else np.full(len(bins),
                                                                                 1 - b.param)
          else:
            keep = np.full(len(bins), 1.0 - min(1.0, t / (b.param * env.max_steps)))
          votes[np.arange(len(bins)), e_bin] += w * keep
          votes += (w * (1 - keep) / bins)[:, None] * (np.arange(votes.shape[1]) < bins[:, None])
        else:
          own = _to_bins(np.asarray(env.systematic_probe(b.name, b.param), np.float64), bins,
                         continuous)
          votes[np.arange(len(bins)), own] += w
          systematic_states += 1
          differs += bool(np.any(own != e_bin))
      states += 1
      disagree += bool(np.any(np.argmax(votes, axis=1) != e_bin))
      _, _, terminated, truncated, _ = env.step(expert.astype(np.float32))
      if terminated or truncated:
        break
  return {"disagreement": disagree / max(states, 1), "states": states,
          "systematic_differs": differs / max(systematic_states, 1)}


def _to_bins(action: np.ndarray, bins: np.ndarray, continuous: bool) -> np.ndarray:
  if not continuous:
    return action.astype(int).reshape(-1)
  x = (np.clip(action.reshape(-1), -1.0, 1.0) + 1.0) / 2.0
  return np.minimum((x * bins).astype(int), bins - 1)


def _gaussian_bin_mass(std: float, bins: np.ndarray) -> np.ndarray:
  """Mass of N(a, std) within a's bin, for a at the bin's centre (width 2 / bins)."""
  if std <= 0:
    return np.ones(len(bins))
  half = (1.0 / bins) / (std * math.sqrt(2.0))
  return np.asarray([math.erf(h) for h in half])
