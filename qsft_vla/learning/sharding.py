"""Where the training state lives on a Mesh of axes ("data", "fsdp").

Data parallelism splits every batch over all devices. FSDP (fully sharded data
parallelism, ZeRO-3) also splits the parameters, the target and both optimiser
states over the "fsdp" axis, so each device holds 1/fsdp of them; jit then
gathers a layer's weights where the step reads them and scatters its gradients
back, and the math is the one-device step's.

Which axis of a leaf is split is decided by rules keyed on its name: the leaf's
path ("params_pi/params/block0/mlp/Dense_0/kernel", and for an optimiser state
"opt_pi/1/0/mu/params/.../kernel": the same name inside) is matched against
regular expressions in order; the first match gives the axis to split ("-"
keeps the leaf whole on every device); when fsdp does not divide that axis, the
largest axis it divides is split instead. A leaf no rule names, a leaf below
`min_size` elements, or one with no axis fsdp divides is replicated:
biases, norms and scalars cost little, and a silent uneven split would cost a
recompile per shape. The default rules split embedding tables on their
vocabulary axis and every other kernel on its output axis, which covers the
Llama decoder, the vision encoders and RT1Small alike.

The rules are jax-free (config.py validates them without importing jax); the
placement functions import jax where they run.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")      # the batch is split over every device
DEFAULT_RULES = ("embedding$:0", "kernel$:-1")
DEFAULT_MIN_SIZE = 2 ** 14         # elements: smaller leaves are replicated


def make_mesh(devices: Sequence[Any], fsdp: int):
  """A (data, fsdp) mesh of `devices`: fsdp devices share each parameter,
  len(devices) / fsdp replicas of that sharded state split the batch."""
  devices = np.asarray(devices)
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f"train.fsdp={fsdp} must be >= 1 and divide the {devices.size} devices")
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  return Mesh(devices.reshape(devices.size // fsdp, fsdp), AXES)


@dataclasses.dataclass(frozen=True)
class Rule:
  pattern: re.Pattern
  axis: int | None      # None: replicate

  @classmethod
  def parse(cls, text: str) -> "Rule":
    """"REGEX:AXIS" (AXIS an integer, negative from the end, or "-")."""
    regex, sep, axis = str(text).rpartition(":")
    if not sep or not regex:
      raise ValueError(f"sharding rule {text!r}: expected 'REGEX:AXIS' (e.g. 'kernel$:-1', "
                       "'norm:-')")
    try:
      pattern = re.compile(regex)
    except re.error as e:
      raise ValueError(f"sharding rule {text!r}: bad regular expression ({e})") from None
    if axis.strip() == "-":
      return cls(pattern, None)
    try:
      return cls(pattern, int(axis))
    except ValueError:
      raise ValueError(f"sharding rule {text!r}: the axis must be an integer or '-', "
                       f"got {axis!r}") from None


def parse_rules(rules: Sequence[str]) -> tuple[Rule, ...]:
  return tuple(Rule.parse(r) for r in rules)


def leaf_name(path) -> str:
  """"params_pi/params/block0/attn/kernel" from a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_spec(name: str, shape: tuple[int, ...], rules: Sequence[Rule], fsdp: int,
              min_size: int = DEFAULT_MIN_SIZE) -> tuple[str | None, ...]:
  """The partition spec of one leaf as a tuple of axis names (see the module
  docstring); () is replicated."""
  if fsdp == 1 or not shape or int(np.prod(shape)) < min_size:
    return ()
  for rule in rules:
    if rule.pattern.search(name):
      if rule.axis is None or not -len(shape) <= rule.axis < len(shape):
        return ()
      # The rule's axis, else the largest other axis fsdp divides (MiniLM's
      # 30522-word vocabulary divides by no even fsdp; its 64-wide rows do).
      first = rule.axis % len(shape)
      others = sorted((i for i in range(len(shape)) if i != first), key=lambda i: -shape[i])
      for axis in (first, *others):
        if shape[axis] % fsdp == 0:
          return tuple("fsdp" if i == axis else None for i in range(len(shape)))
      return ()
  return ()


def tree_shardings(tree, mesh, rules: Sequence[Rule], min_size: int = DEFAULT_MIN_SIZE,
                   prefix: str = ""):
  """NamedShardings for every leaf of `tree` (a pytree of arrays or ShapeDtypeStructs)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  fsdp = int(mesh.shape["fsdp"]) if "fsdp" in mesh.shape else 1

  def one(path, leaf):
    name = prefix + leaf_name(path)
    return NamedSharding(mesh, P(*leaf_spec(name, tuple(np.shape(leaf)), rules, fsdp, min_size)))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh, steps_axis: bool = False):
  """The batch axis split over every device ([S, B, ...] with steps_axis)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(None, axes) if steps_axis else P(axes))


def global_batch(batch, sharding):
  """This process's numpy batch -> one global jax.Array per leaf laid out by
  `sharding` over every process's devices (its rows are this process's share,
  in process order). The identity for one process: jit places numpy itself."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return batch
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def bytes_per_device(tree) -> dict[Any, int]:
  """Bytes of `tree`'s leaves held on each device (shards counted where they live)."""
  import jax  # pylint: disable=g-import-not-at-top
  out: dict[Any, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
  return out
