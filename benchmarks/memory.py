"""Training-state bytes per device with FSDP, and the step's peak per device.

  .venv/bin/python benchmarks/memory.py --out=benchmarks/results/memory.md

For each config and fsdp size:
- the state per device: the parameters, the Polyak target and both Adam states
  of a TrainState (LoRA: of the adapter sets, plus the frozen base), each leaf
  whole or 1/fsdp of it as train.sharding_rules place it. This is counted from
  the state's shapes (jax.eval_shape: nothing is allocated, so the
  135M-parameter backbone costs nothing to count).
- with --step_peak, for configs whose step compiles in seconds on a CPU: what
  XLA reports for the compiled step on a (data, fsdp) mesh of 8 host devices
  (arguments, outputs, and temporaries per device).
"""

from __future__ import annotations

import os
import sys

# Host CPU devices for the step's mesh; must be set before jax starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import report  # noqa: E402
from qsft_vla import train  # noqa: E402
from qsft_vla.learning import sharding  # noqa: E402

_CONFIGS = flags.DEFINE_list(
    "configs", ["robot_configs/babyai.py:qsft", "robot_configs/babyai.py:bc",
                "robot_configs/babyai.py:vlm_smollm2",
                "robot_configs/babyai.py:vlm_smollm2+lora"], "config specs")
_FSDP = flags.DEFINE_list("fsdp", ["1", "2", "4", "8"], "fsdp sizes")
_STEP_PEAK = flags.DEFINE_list("step_peak", ["robot_configs/babyai.py:qsft",
                                             "robot_configs/babyai.py:bc"],
                               "configs whose compiled step is measured (small models only)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch of the compiled step")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")

MIB = 2 ** 20


def _setup(spec: str, fsdp: int = 1):
  cfg = report.load_config(spec)
  cfg.data.dir = cfg.data.dir or "unused"
  cfg.train.fsdp = fsdp
  cfg.train.batch_size = _BATCH.value
  return train.build(cfg, stats=[None])


def state_bytes(setup, fsdp: int) -> tuple[int, int]:
  """(bytes of the whole state, bytes per device at this fsdp size)."""
  shapes = jax.eval_shape(lambda: setup.init_state(pretrained=False))
  total = per_device = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    spec = sharding.leaf_spec(sharding.leaf_name(path), tuple(leaf.shape),
                              setup.learner.rules, fsdp)
    total += nbytes
    per_device += nbytes // fsdp if "fsdp" in spec else nbytes
  return total, per_device


def step_peak(spec: str, fsdp: int) -> dict[str, float]:
  """XLA's per-device sizes of the compiled step on 8 host devices."""
  setup = _setup(spec, fsdp)
  state = setup.init_state(pretrained=False)
  batch = setup.learner._select(report.synthetic_batch(setup, _BATCH.value))  # pylint: disable=protected-access
  setup.learner.step(state, batch)  # builds the jitted step with its shardings
  compiled = setup.learner._jit_step.lower(state, batch).compile()  # pylint: disable=protected-access
  m = compiled.memory_analysis()
  return {"args": m.argument_size_in_bytes / MIB, "out": m.output_size_in_bytes / MIB,
          "temp": m.temp_size_in_bytes / MIB}


def main(argv):
  del argv
  sizes = [int(f) for f in _FSDP.value]
  lines = ["# Training-state memory per device with FSDP", "",
           f"`{' '.join(sys.argv)}`", "",
           f"Machine: {report.machine()} (host CPU devices stand in for accelerators; "
           "the bytes are the same on any backend).", "",
           "## State per device (parameters, Polyak target, both Adam states; with LoRA "
           "the adapter sets, their Adam states and the frozen base)", "",
           "Counted from the state's shapes and `train.sharding_rules` (the defaults).", "",
           "| config | whole state MiB | " + " | ".join(f"fsdp {f} MiB/device" for f in sizes)
           + " | fsdp " + str(sizes[-1]) + " / whole |",
           "|---|---|" + "---|" * len(sizes) + "---|"]
  for spec in _CONFIGS.value:
    setup = _setup(spec)
    row = [state_bytes(setup, f) for f in sizes]
    total = row[0][0]
    lines.append(f"| `{spec}` | {total / MIB:.1f} | "
                 + " | ".join(f"{d / MIB:.1f}" for _, d in row)
                 + f" | {row[-1][1] / total:.3f} |")
    print(lines[-1], flush=True)
  if _STEP_PEAK.value:
    lines += ["", f"## The compiled step, per device (8 host devices, global batch {_BATCH.value})",
              "", "XLA's memory analysis of the jitted step on a (data, fsdp) mesh: arguments "
              "(state and batch shard), outputs, temporaries (activations, gathered weights, "
              "gradients).", "",
              "| config | fsdp | mesh | arguments MiB | outputs MiB | temporaries MiB |",
              "|---|---|---|---|---|---|"]
    for spec in _STEP_PEAK.value:
      for f in sizes:
        m = step_peak(spec, f)
        lines.append(f"| `{spec}` | {f} | {8 // f} x {f} | {m['args']:.1f} | {m['out']:.1f} | "
                     f"{m['temp']:.1f} |")
        print(lines[-1], flush=True)
  lines.append("")
  report.emit("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  app.run(main)
