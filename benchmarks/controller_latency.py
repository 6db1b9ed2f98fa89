"""Controller latency per act() (what a robot host pays per control step).

  .venv/bin/python benchmarks/controller_latency.py [--calls=500] \
      [--configs=robot_configs/babyai.py:qsft,...] [--architectures=separate,shared] \
      [--override=model.vlm.compute_dtype=bfloat16 ...] [--nopretrained] \
      [--extractions=p,sample] [--out=benchmarks/results/controller_latency.md]

For each config (default: both robot configs' default models, Q-SFT and BC)
and each architecture (Q-SFT only; BC has one network), builds the learner's
initial params, wraps them in the robot-host Controller exactly as
Controller.load would, and times `calls` act() calls on random observations
after the warm-up, with a reset every 50 calls (a new episode: the history
restarts). Reported: p50 and p99 per call, end to end (input checks,
host->device copy, prefix encoding, D decoding steps for pi_phi and p_theta,
decode to float actions, bounds guard). Latency does not depend on the
weights' values, so --nopretrained (random init) measures the same thing
where the packaged weights are not installed.

Q-SFT acts with the config's extraction (the robot configs': "sample", 32
candidate actions through both networks) unless --extractions names several;
they then take turns as the cache choices do below. BC acts greedily ("p" at
beta 0) whatever is asked.

Robots with one action dimension act in one pass without a KV cache (the
Controller's default); with --kv_cache_too they are also timed through the KV
cache (encode_prefix + one decode step), the two controllers taking turns in
blocks of 50 calls so that both see the same machine load.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import train  # noqa: E402
from qsft_vla.policy import Controller  # noqa: E402

_CALLS = flags.DEFINE_integer("calls", 500, "act() calls per controller (after warm-up)")
_CONFIGS = flags.DEFINE_list("configs", ["robot_configs/babyai.py:qsft",
                                         "robot_configs/babyai.py:bc",
                                         "robot_configs/metaworld.py:qsft",
                                         "robot_configs/metaworld.py:bc"],
                             "config specs (file[:variant]) to measure")
_ARCHS = flags.DEFINE_list("architectures", ["separate", "shared"],
                           "Q-SFT learner architectures to measure")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "config field=value for every config")
_PRETRAINED = flags.DEFINE_bool("pretrained", True, "load pretrained weights where the config "
                                "does (off: random init)")
_KV_TOO = flags.DEFINE_bool("kv_cache_too", True, "one action dimension: also time the "
                            "KV-cache path, side by side")
_EXTRACTIONS = flags.DEFINE_list("extractions", [], "Q-SFT extractions to time side by side "
                                 "(p, ratio, sample; default: the config's own)")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")


def controller_for(spec: str, architecture: str, kv_cache=(None,), extractions=(None,)):
  """([Controller per (kv_cache, extraction) choice], config, model config) for a
  config spec; extraction None: the config's."""
  cfg = report.load_config(spec, _OVERRIDE.value)
  cfg.learner.architecture = architecture
  cfg.data.dir = cfg.data.dir or "unused"
  setup = train.build(cfg, stats=[None])
  state = setup.init_state(pretrained=_PRETRAINED.value)
  policy = setup.policy.with_params(jax.device_get(setup.learner.inference_params(state)))
  return ([Controller(policy, kv_cache=k, extraction=e) for k in kv_cache for e in extractions],
          cfg, policy.model_config)


def measure(ctrls: list[Controller], calls: int, seed: int = 0) -> list[dict[str, float]]:
  """Latency stats of each controller, taking turns in blocks of 50 calls (one
  episode each) on the same observations."""
  rng = np.random.default_rng(seed)
  spec = ctrls[0].spec
  for ctrl in ctrls:
    ctrl.reset_latency_stats()
  for start in range(0, calls, 50):
    frames = []
    for _ in range(min(50, calls - start)):
      obs = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
             for c in spec.cameras}
      if spec.state_dim:
        obs["state"] = rng.standard_normal(spec.state_dim).astype(np.float32)
      frames.append(obs)
    for ctrl in ctrls:
      ctrl.reset("pick up the red ball and put it in the box")
      for obs in frames:
        ctrl.act(obs)
  return [ctrl.latency_stats() for ctrl in ctrls]


def _extraction(ctrl: Controller) -> str:
  """The extraction a controller acts with, as the table names it."""
  if not ctrl.has_p:
    return "greedy pi_phi"
  k = f", {ctrl.sampling['sample_k']} candidates" if ctrl.extraction == "sample" else ""
  return f"{ctrl.extraction}, beta {ctrl.beta:g}{k}"


def main(argv):
  del argv
  lines = ["# Controller latency per act() on this machine", "",
           f"`{' '.join(sys.argv)}`", "",
           f"Machine: {report.machine()}. {_CALLS.value} calls each after warm-up, batch 1.", "",
           "| config | learner | architecture | model | decoding | extraction | p50 ms | p99 ms "
           "| mean ms |",
           "|---|---|---|---|---|---|---|---|---|"]
  for spec in _CONFIGS.value:
    cfg = report.load_config(spec, _OVERRIDE.value)
    algorithm = cfg.learner.algorithm
    for arch in (_ARCHS.value if algorithm == "qsft" else ["separate"]):
      one_dim = len(cfg.robot.action.names) == 1
      choices = (None, True) if one_dim and _KV_TOO.value else (None,)
      extractions = tuple(_EXTRACTIONS.value) if algorithm == "qsft" and _EXTRACTIONS.value \
          else (None,)
      ctrls, cfg, m = controller_for(spec, arch, choices, extractions)
      pairs = [k for k in choices for _ in extractions]  # controller_for's order
      for ctrl, k, s in zip(ctrls, pairs, measure(ctrls, _CALLS.value)):
        path = "one pass, no cache" if one_dim and k is None else "KV cache"
        lines.append(f"| {spec} | {algorithm} | {arch} | "
                     f"{report.model_summary(cfg.model.name, m)} | {path} | {_extraction(ctrl)} "
                     f"| {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['mean_ms']:.2f} |")
        print(lines[-1], flush=True)
      del ctrls
  text = "\n".join(lines) + "\n"
  report.emit(text, _OUT.value)


if __name__ == "__main__":
  app.run(main)
