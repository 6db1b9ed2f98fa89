"""Shared by the benchmark scripts: configs from flags, what was measured, result tables."""

from __future__ import annotations

import ast
import os
import platform

import jax

from qsft_vla import config as qconfig


def emit(text: str, out: str | None) -> None:
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)


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
