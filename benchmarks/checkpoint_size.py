"""Checkpoint bytes on disk: full fine-tuning vs LoRA, item by item.

  .venv/bin/python benchmarks/checkpoint_size.py --out=benchmarks/results/checkpoint_size.md

For each config: the initial training state (the pretrained weights loaded as
training loads them) made to look trained, then written by checkpoints.save,
the function training calls, into a temporary folder; the bytes of each item
are counted on disk and the folder is deleted. Orbax compresses, and at step 0
the Adam moments, LoRA's B factors and zero-initialised biases are all zeros
(they would take almost nothing), so every all-zero float leaf is first filled
with random values, as training fills them. The data iterator's position, a
few KB written only by training, is left out.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import report  # noqa: E402
from qsft_vla import train  # noqa: E402
from qsft_vla.models import lora  # noqa: E402
from qsft_vla.policy import checkpoints, layout  # noqa: E402

_CONFIGS = flags.DEFINE_list(
    "configs", ["robot_configs/babyai.py:vlm_smollm2+separate",
                "robot_configs/babyai.py:vlm_smollm2+pi_head",
                "robot_configs/babyai.py:vlm_smollm2+lora",
                "robot_configs/babyai.py:bc+vlm_smollm2+lora"], "config specs")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")

MB = 1e6
ITEMS = layout.GROUPS + (checkpoints.OPT,)


def _bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def _as_trained(tree, seed: int = 0):
  """Every all-zero float leaf filled with random normal values (incompressible)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    x = np.asarray(x)
    if x.dtype.kind == "f" and x.size > 1 and not x.any():
      return rng.normal(size=x.shape).astype(x.dtype)
    return x
  return jax.tree_util.tree_map(fill, tree)


def measure(spec: str) -> dict:
  cfg = report.load_config(spec)
  cfg.data.dir = cfg.data.dir or "unused"
  setup = train.build(cfg, stats=[None])
  state = setup.init_state()
  items = _as_trained(train._state_items(state))  # pylint: disable=protected-access
  folder = tempfile.mkdtemp(prefix="qsft_ckpt_size_")
  try:
    mngr = checkpoints.manager(folder)
    checkpoints.save(mngr, 0, items, setup.meta(), setup.policy.text_tokenizer)
    step = os.path.join(folder, "0")
    sizes = {i: _bytes(os.path.join(step, i)) for i in ITEMS
             if os.path.isdir(os.path.join(step, i))}
    total = _bytes(step)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  return {"spec": spec, "model": report.model_summary(setup.policy.model_name,
                                                      setup.policy.model_config),
          "trained": (lora.count(state.params_pi), lora.count(state.params_p)),
          "base": lora.count(state.base),
          "sizes": sizes, "total": total}


def table(rows: list[dict]) -> str:
  ref = rows[0]["total"]
  head = ("| config | trained params pi_phi / p_theta | frozen base params | "
          + " | ".join(ITEMS) + " | checkpoint | vs first row |")
  lines = [f"# Checkpoint size on disk\n\nMachine: {report.machine()}. Model: {rows[0]['model']}.",
           "Bytes of each orbax item of a checkpoint written by `checkpoints.save` "
           "(MB = 1e6 bytes), as after training (all-zero leaves filled; module docstring); "
           "the frozen base of a LoRA run is not written, only its sha256.",
           "", head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    cells = [f"{r['sizes'].get(i, 0) / MB:.1f}" for i in ITEMS]
    pi, p = r["trained"]
    lines.append(f"| `{r['spec'].split('/')[-1]}` | {pi / 1e6:.3f}M / {p / 1e6:.3f}M | "
                 f"{r['base'] / 1e6:.1f}M | " + " | ".join(cells)
                 + f" | {r['total'] / MB:.1f} MB | {100 * r['total'] / ref:.1f}% |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  report.emit(table([measure(spec) for spec in _CONFIGS.value]), _OUT.value)


if __name__ == "__main__":
  app.run(main)
