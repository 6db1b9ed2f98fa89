"""LoRA: pi_phi, p_theta and the Polyak target as three adapter sets on one frozen base.

A model's variables split three ways (`split`), by the leaves' paths
("params/lm/layers_3/self_attn/q_proj/kernel"):
  adapted  pretrained kernels (2-D or more) whose path matches `targets`: the
           frozen W0 lives in the base; each set holds A [in, r] and B [r, out]
           and the network uses W0 + (alpha / r) * A @ B. A is random, B zero,
           so every set starts exactly equal to the base (the paper: all three
           networks start from the pretrained model);
  frozen   the other pretrained leaves: in the base only, never trained;
  trained  every leaf that is not from pretrained weights (new layers: the
           projectors, output heads, the RT-1 transformer), and pretrained
           leaves matching `full`: trained in full, one copy per set.
So the base is exactly the pretrained weights (`pretrained` names their paths):
a checkpoint holds the sets and the base's identity (`identity`), and a
loader rebuilds the base from the same weight packages.

A set is {"adapters": {...kernel path...: {"a", "b"}}, "trained": {...}},
nested like the model's variables; the learner's optimisers, Polyak update and
finiteness checks run on sets as on full variables. The Polyak target is a
set too: it averages A, B and the trained leaves, so its delta is the
product of averaged factors, a slow copy of p_theta's adapters rather than
the average of its products (the two agree while the adapters move slowly).

jax and flax only (no optax, no TF): the Controller merges sets with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qsft_vla.learning.spec import DEFAULT_LORA_TARGETS

ADAPTED, FROZEN, TRAINED = "adapted", "frozen", "trained"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """rank r, alpha (the delta is scaled by alpha / r), `targets`: a regex
  searched in each pretrained leaf's path (those of 2 dims or more are
  adapted), `full`: a regex of pretrained leaves trained in full ("" none).
  LearnerConfig validates the values (its lora_* fields)."""
  rank: int
  alpha: float = 16.0
  targets: str = DEFAULT_LORA_TARGETS
  full: str = ""

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _flat(tree) -> dict[tuple, Any]:
  return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _unflat(flat: Mapping[tuple, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def classify(variables, pretrained: Iterable[tuple], spec: LoraSpec) -> dict[tuple, str]:
  """{leaf path: ADAPTED | FROZEN | TRAINED} for a model's (concrete or abstract)
  variables; `pretrained`: the paths of the leaves loaded from pretrained weights.
  Raises ValueError when `targets` adapts nothing."""
  pretrained = set(pretrained)
  flat = _flat(variables)
  unknown = sorted(path_str(p) for p in pretrained if p not in flat)
  if unknown:
    raise ValueError(f"pretrained leaves not in the model: {unknown[:3]}")
  targets, full = re.compile(spec.targets), re.compile(spec.full) if spec.full else None
  kinds = {}
  for path, leaf in flat.items():
    name = path_str(path)
    if path not in pretrained or (full is not None and full.search(name)):
      kinds[path] = TRAINED
    elif np.ndim(leaf) >= 2 and targets.search(name):
      kinds[path] = ADAPTED
    else:
      kinds[path] = FROZEN
  if ADAPTED not in kinds.values():
    raise ValueError(f"LoRA targets {spec.targets!r} match no pretrained kernel of the model "
                     f"({len(pretrained)} pretrained leaves, e.g. "
                     f"{[path_str(p) for p in sorted(pretrained)[:3]]})")
  return kinds


def _factors(shape) -> tuple[int, int]:
  """A kernel [..., out] as a matrix [prod(...), out] (convolutions: [kh*kw*in, out])."""
  return int(np.prod(shape[:-1])), int(shape[-1])


def split(variables, pretrained: Iterable[tuple], spec: LoraSpec, rng=None):
  """(base, adapter set) of a model's variables. With rng, A is drawn like a
  Dense kernel of fan-in `in` (variance 1 / in) and B is zero; without rng
  (abstract variables) the set holds ShapeDtypeStructs."""
  kinds = classify(variables, pretrained, spec)
  flat = _flat(variables)
  base, trained, adapters = {}, {}, {}
  adapted = [p for p in flat if kinds[p] == ADAPTED]
  keys = dict(zip(adapted, jax.random.split(rng, len(adapted)))) if rng is not None else {}
  for path, leaf in flat.items():
    if kinds[path] == TRAINED:
      trained[path] = leaf
      continue
    base[path] = leaf
    if kinds[path] == ADAPTED:
      n_in, n_out = _factors(leaf.shape)
      if rng is None:
        a = jax.ShapeDtypeStruct((n_in, spec.rank), leaf.dtype)
        b = jax.ShapeDtypeStruct((spec.rank, n_out), leaf.dtype)
      else:
        a = (jax.random.normal(keys[path], (n_in, spec.rank), jnp.float32)
             / math.sqrt(n_in)).astype(leaf.dtype)
        b = jnp.zeros((spec.rank, n_out), leaf.dtype)
      adapters[path + ("a",)] = a
      adapters[path + ("b",)] = b
  return _unflat(base), {"adapters": _unflat(adapters), "trained": _unflat(trained)}


def merge(base, adapter_set, spec: LoraSpec):
  """The full variables one adapter set stands for: the base's frozen leaves,
  W0 + scale * A @ B for each adapted kernel, the set's trained leaves. Jittable;
  gradients flow to the set only when the base is held constant."""
  out = _flat(base)
  ab = _flat(adapter_set["adapters"])
  for path in {p[:-1] for p in ab}:
    w0 = out[path]
    delta = (ab[path + ("a",)] @ ab[path + ("b",)]).reshape(w0.shape)
    out[path] = w0 + (spec.scale * delta).astype(w0.dtype)
  missing = [p for p in _flat(adapter_set["trained"]) if p in out]
  if missing:
    raise ValueError(f"trained leaves also in the base: {[path_str(p) for p in missing[:3]]}")
  out.update(_flat(adapter_set["trained"]))
  return _unflat(out)


def identity(base) -> str:
  """sha256 over the base's leaves (sorted paths, dtypes, shapes and bytes): the
  same weights give the same digest whatever package or folder they came from."""
  h = hashlib.sha256()
  for path, leaf in sorted(_flat(base).items()):
    x = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{path_str(path)}|{x.dtype.str}|{x.shape}\n".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def base_of(pretrained_variables, kinds: Mapping[tuple, str]):
  """The base (adapted and frozen leaves) out of variables holding the pretrained
  weights (e.g. registry.pretrained_params), by a `classify` result."""
  flat = _flat(pretrained_variables)
  missing = [path_str(p) for p, k in kinds.items() if k != TRAINED and p not in flat]
  if missing:
    raise ValueError(f"the pretrained weights lack {missing[:3]}")
  return _unflat({p: flat[p] for p, k in kinds.items() if k != TRAINED})


def paths(tree) -> list[tuple]:
  """Leaf paths of a nested dict (e.g. registry.pretrained_params's output)."""
  return list(_flat(tree))


def count(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def spec_of(learner) -> Optional[LoraSpec]:
  """The LoraSpec of a LearnerConfig (None: full fine-tuning, lora_rank 0)."""
  if not learner.lora_rank:
    return None
  return LoraSpec(learner.lora_rank, learner.lora_alpha, learner.lora_targets, learner.lora_full)
