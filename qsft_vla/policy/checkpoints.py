"""Self-describing orbax checkpoints: written by training, read by training and the controller.

Layout: <workdir>/checkpoints/<step>/ (an orbax CheckpointManager; each step
directory is written under a temporary name and renamed when complete, so a
killed run never leaves a half checkpoint under a step's name), with items

  params_pi      pi_phi's variables (shared trunk: the trunk and the pi head)
  params_p       p_theta's variables (shared trunk: the p head only); Q-SFT only
  params_target  p_theta_bar (Polyak target); Q-SFT with a bootstrapped target only
                 (LoRA: the three are adapter sets; the frozen base is not
                 written, meta names it by sha256: lora_base)
  opt            {"opt_pi", "opt_p", "step", "rng"}: what else resuming needs
  meta           JSON: format, step, the run's config, the model description,
                 learner config, action tokenizer spec, robot spec, dataset
                 statistics, image sizes
  text_tokenizer JSON: the instruction tokenizer's tokenizer.json document
  data_iterator  training only: the tf.data iterator position
                 (training/data_iterator.py; needs TensorFlow)
and qsft_checksums.json: size and sha256 of every file of those items, written
after the save completes and checked before any item is read back (read_meta,
restore), so a truncated or bit-flipped checkpoint is refused, naming the file,
instead of acting. Costs ~1 s per GB read (checksums.py); a step without the
manifest (written before it existed) loads unchecked.

Arrays are orbax/tensorstore, everything else JSON: nothing is unpickled, so
loading a checkpoint cannot run code. This module is TF-free: the robot host
(TrainedPolicy.load, bundle.py) restores only the params it acts with (pi_phi
and p_theta), with shapes from the model description, so a checkpoint of
another model or action space fails with a clear error instead of loading
garbage.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from qsft_vla import checksums
from qsft_vla.errors import CheckpointError, DamagedCheckpointError  # noqa: F401 (re-exported)
from qsft_vla.policy import layout
from qsft_vla.tokenizers.text import TextTokenizer

FORMAT = "qsft_vla.checkpoint"
VERSION = 1
SUBDIR = "checkpoints"
META = "meta"
TEXT_TOKENIZER = "text_tokenizer"
PARAM_ITEMS = layout.GROUPS
OPT = "opt"
CHECKSUMS = "qsft_checksums.json"
INFERENCE_ITEMS = layout.ACTING_GROUPS + (META, TEXT_TOKENIZER)  # what TrainedPolicy.load reads


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), SUBDIR)


def remove_interrupted_saves(ckpt_dir: str) -> list[str]:
  """Deletes what an interrupted save (kill, disk full) left: orbax's
  `*.orbax-checkpoint-tmp-*` step folders, which are never complete checkpoints and
  make the next save of that step fail. Returns the removed names. Only the one
  training process of a workdir may call this (it owns the folder)."""
  if not os.path.isdir(ckpt_dir):
    return []
  removed = sorted(n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp-" in n)
  for name in removed:
    path = os.path.join(ckpt_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  return removed


def manager(ckpt_dir: str, keep: Optional[int] = None,
            item_handlers: Optional[Mapping[str, Any]] = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  """A synchronous CheckpointManager over `ckpt_dir` keeping the last `keep` steps."""
  # read_only only stops us creating the directory (orbax's own read_only mode
  # logs warnings on every open).
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(ckpt_dir, options=options,
                               item_handlers=dict(item_handlers) if item_handlers else None)


def _has_leaves(tree) -> bool:
  return bool(jax.tree_util.tree_leaves(tree))


def save(mngr: ocp.CheckpointManager, step: int, state_items: Mapping[str, Any],
         meta: Mapping[str, Any], text_tokenizer: TextTokenizer,
         extra: Optional[Mapping[str, Any]] = None) -> None:
  """Writes one step: state_items (name -> pytree; empty ones are skipped),
  meta, the text tokenizer and `extra` (name -> orbax CheckpointArgs)."""
  args = {name: ocp.args.StandardSave(tree) for name, tree in state_items.items()
          if _has_leaves(tree)}
  args[META] = ocp.args.JsonSave(dict(meta, step=int(step)))
  args[TEXT_TOKENIZER] = ocp.args.JsonSave(json.loads(text_tokenizer.to_str()))
  args.update(extra or {})
  mngr.save(int(step), args=ocp.args.Composite(**args), force=True)
  mngr.wait_until_finished()
  if jax.process_index() == 0:  # one manifest, by the process that finalised the step
    write_checksums(os.path.join(os.fspath(mngr.directory), str(int(step))))
  if jax.process_count() > 1:  # nobody reads the step before its manifest is there
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"qsft_vla checkpoint {int(step)}")


def write_checksums(step_dir: str) -> None:
  """The manifest of a complete step directory, written atomically."""
  doc = {"algorithm": "sha256", "files": checksums.manifest(step_dir)}
  tmp = os.path.join(step_dir, f".{CHECKSUMS}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(doc, f)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify(ckpt_dir: str, step: int, items) -> bool:
  """Checks the files of `items` of one step against its manifest. True when
  checked, False when the step has no manifest; raises CheckpointError naming
  what differs (and the other steps there are) otherwise."""
  ckpt_dir = os.fspath(ckpt_dir)
  step_dir = os.path.join(ckpt_dir, str(int(step)))
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DamagedCheckpointError(f"{step_dir}: unreadable checksum manifest {path}: {e}") from e
  problems = checksums.mismatches(step_dir, expected, items)
  if problems:
    others = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and int(n) != step)
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    hint = (f"other checkpoints there: steps {others} (load one by its step; to resume "
            f"training from the newest of them, move {step_dir} out of {ckpt_dir})"
            if others else "no other checkpoint there")
    raise DamagedCheckpointError(
        f"{step_dir}: damaged since it was saved, refusing to load it: "
        + "; ".join(problems[:5]) + more + f". {hint}")
  return True


def restore(mngr: ocp.CheckpointManager, step: int, abstract_items: Mapping[str, Any],
            extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Restores the named pytrees to the shapes/dtypes/shardings of abstract_items
  (empty ones come back empty), plus meta and `extra` (name -> restore args)."""
  args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()
          if _has_leaves(tree)}
  args[META] = ocp.args.JsonRestore()
  args.update(extra or {})
  verify(mngr.directory, step, args)
  try:
    out = mngr.restore(int(step), args=ocp.args.Composite(**args))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{mngr.directory}/{step}: cannot restore {sorted(args)}: {e}") from e
  result = {name: (out[name] if name in args else tree) for name, tree in abstract_items.items()}
  result[META] = out[META]
  for name in (extra or {}):
    result[name] = out[name]
  return result


# --------------------------------------------------------------------------- #
# Metadata (what it holds: policy/bundle.py, TrainedPolicy.meta).


def check_meta(meta: Mapping[str, Any], where: str) -> None:
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{where}: not a qsft_vla checkpoint (format {meta.get('format')!r})")
  if meta.get("version") != VERSION:
    raise CheckpointError(f"{where}: checkpoint version {meta.get('version')!r}; this code "
                          f"reads version {VERSION}")


def resolve(path: str, step: Optional[int] = None) -> tuple[str, int]:
  """(checkpoint directory, step) for a workdir, its checkpoints/ directory or
  one step directory; the latest complete step unless `step` is given."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: " + ("a file, not a training workdir or checkpoint folder"
                                         if os.path.exists(path) else "no such directory"))
  base = os.path.basename(path)
  if step is None and base.isdigit() and os.path.isdir(os.path.join(path, META)):
    return os.path.dirname(path), int(base)
  ckpt_dir = path if base == SUBDIR else directory(path)
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"{path}: no checkpoints (expected {ckpt_dir})")
  steps = manager(ckpt_dir, read_only=True).all_steps()
  if not steps:
    raise CheckpointError(f"{ckpt_dir}: no complete checkpoint")
  if step is None:
    return ckpt_dir, max(steps)
  if step not in steps:
    raise CheckpointError(f"{ckpt_dir}: no checkpoint at step {step}; have {sorted(steps)}")
  return ckpt_dir, int(step)


def newest_intact(path: str, items=None) -> tuple[int, list[str]]:
  """(newest step of a workdir / checkpoints dir whose `items` match their
  manifest, one message per newer damaged step). Raises CheckpointError when
  none is intact. For training and evaluation, which may fall back; the
  Controller refuses a damaged step instead."""
  ckpt_dir, latest = resolve(path)
  if os.path.basename(os.path.abspath(os.fspath(path))).isdigit():
    verify(ckpt_dir, latest, items)   # one step named explicitly: no fallback
    return latest, []
  skipped = []
  for step in sorted(manager(ckpt_dir, read_only=True).all_steps(), reverse=True):
    if step > latest:
      continue
    try:
      verify(ckpt_dir, step, items)
      return int(step), skipped
    except DamagedCheckpointError as e:
      skipped.append(str(e))
  raise CheckpointError(f"{ckpt_dir}: no intact checkpoint: " + " | ".join(skipped))


def set_aside(ckpt_dir: str, step: int) -> str:
  """Renames a damaged step folder to <step>.damaged-<n> (orbax no longer sees it,
  nothing is deleted) and returns the new path."""
  src = os.path.join(os.fspath(ckpt_dir), str(int(step)))
  n = 0
  while os.path.exists(f"{src}.damaged-{n}"):
    n += 1
  os.rename(src, f"{src}.damaged-{n}")
  return f"{src}.damaged-{n}"


def _read_json_item(ckpt_dir: str, step: int, item: str, what: str) -> Any:
  """A JSON item of one step (orbax JsonSave writes <item>/metadata), checked
  against the manifest first."""
  verify(ckpt_dir, step, (item,))
  path = os.path.join(ckpt_dir, str(step), item, "metadata")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{ckpt_dir}/{step}: unreadable {what} {path}: {e}") from e


def read_meta(ckpt_dir: str, step: int) -> dict[str, Any]:
  meta = _read_json_item(ckpt_dir, step, META, "metadata")
  check_meta(meta, f"{ckpt_dir}/{step}")
  return meta


def read_text_tokenizer(ckpt_dir: str, step: int) -> TextTokenizer:
  """The instruction tokenizer saved with a step (checked against the manifest)."""
  doc = _read_json_item(ckpt_dir, step, TEXT_TOKENIZER, "tokenizer")
  return TextTokenizer.from_str(json.dumps(doc), where=f"{ckpt_dir}/{step}/{TEXT_TOKENIZER}")


def check_finite(tree, where: str) -> None:
  """A checkpoint with a NaN or inf parameter is refused, naming the first one."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(leaf)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
      raise CheckpointError(f"{where}: parameter {jax.tree_util.keystr(path)} holds "
                            f"{int((~np.isfinite(x)).sum())} non-finite value(s); refusing to "
                            "load it (train stops before saving such a checkpoint: this one "
                            "was written by something else or damaged)")
