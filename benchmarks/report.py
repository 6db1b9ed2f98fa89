"""Shared by the benchmark scripts: configs from flags, what was measured, result tables."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import time

import jax
import numpy as np

from qsft_vla import config as qconfig
from qsft_vla.models import registry


def emit(text: str, out: str | None) -> None:
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_binary(cmd: list[str], log: str) -> float:
  """Runs a binary of this package from the repository root, its output into `log`;
  fails loudly with the log's tail. Returns the seconds it took."""
  os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
  start = time.time()
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  if proc.returncode:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); log {log}:\n{tail}")
  return time.time() - start


def load_config(spec: str, overrides=()):
  """A config file spec ("path.py[:variant]") with "a.b.c=value" overrides
  (values parsed as Python literals where they are one, e.g. 1e-4, (8, 8))."""
  cfg = qconfig.load_config_file(spec)
  fields = {}
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--override {item!r}: expected field=value")
    try:
      fields[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fields[key] = text
  cfg.update_from_flattened_dict(fields)
  qconfig.validate(cfg, where=spec)
  return cfg


def load_learner_config(spec: str, learner: str, overrides=()):
  """load_config with the learner "<algorithm>[+modifier...]" (e.g. "qsft+lora")
  applied: the modifiers (config.MODIFIER_VARIANTS), then the algorithm."""
  cfg = load_config(spec, overrides)
  algorithm, *modifiers = learner.split("+")
  for m in modifiers:
    if m not in qconfig.MODIFIER_VARIANTS:
      raise ValueError(f"learner {learner!r}: unknown modifier {m!r}; known: "
                       f"{', '.join(qconfig.MODIFIER_VARIANTS)}")
    qconfig.MODIFIER_VARIANTS[m](cfg)
  qconfig.apply_algorithm_variant(cfg, algorithm, where=spec)
  qconfig.validate(cfg, where=f"{spec} ({learner})")
  return cfg


def model_summary(name: str, m) -> str:
  """One line naming the backbone and the sizes that set its cost."""
  if name == "vlm":
    lm = m.lm()
    return (f"vlm: {lm.num_hidden_layers}-layer Llama width {lm.hidden_size} "
            f"({os.path.basename(m.lm_folder or 'SmolLM2-135M')}) + EfficientNet-Lite0, "
            f"{m.image_tokens_per_frame} image tokens/frame, {m.max_text_len} text tokens, "
            f"window {m.window}, {m.num_action_dims} action dims, {m.compute_dtype}")
  encoders = (f"{m.image_encoder}/{m.text_encoder}"
              if (m.image_encoder, m.text_encoder) != ("conv", "learned")
              else f"conv {list(m.conv_channels)}")
  return (f"{name}: {encoders}, width {m.width}, depth {m.depth}, window {m.window}, "
          f"{m.num_action_dims} action dims")


def machine() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", jax.default_backend())
  return (f"{platform.machine()}, {os.cpu_count()} CPUs visible, jax {jax.__version__} on "
          f"{jax.default_backend()} ({jax.device_count()} x {kind})")


def synthetic_batch(setup, batch_size: int, seed: int = 0):
  """A random training batch of the run's shapes (benchmarks read no dataset)."""
  rng = np.random.default_rng(seed)
  obs, hm, ti, tm, tok = registry.example_inputs(setup.policy.model_config, setup.policy.image_sizes,
                                                 batch_size)
  obs = {k: (rng.integers(0, 256, v.shape).astype(np.uint8) if v.dtype == np.uint8
             else rng.standard_normal(v.shape).astype(v.dtype)) for k, v in obs.items()}
  bins = np.asarray(setup.policy.action_tokenizer.bins_per_dim)
  tok = (rng.integers(0, 1 << 30, tok.shape) % bins).astype(np.int32)
  return {"observation": obs, "history_mask": hm, "next_observation": obs,
          "next_history_mask": hm, "text_ids": ti, "text_mask": tm, "action_tokens": tok,
          "reward": (rng.random(batch_size) < 0.1).astype(np.float32),
          "terminal": rng.random(batch_size) < 0.1, "has_next": rng.random(batch_size) < 0.9,
          "return_to_go": rng.random(batch_size).astype(np.float32),  # mc_mix / mc_lower_bound
          # One long episode: the rows are consecutive steps, as learner.chunk_length checks.
          "episode_index": np.zeros(batch_size, np.int32),
          "step_index": np.arange(batch_size, dtype=np.int32)}
