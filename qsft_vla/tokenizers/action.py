"""Per-dimension action tokenizer: a robot action in R^D <-> D tokens.

Each action dimension is one token (QSFT.md, "Tokens as actions"): a continuous
dimension is split into `bins` equal bins between its bounds and decodes to the
bin centre; a discrete dimension (gripper, terminate, a grid-world action id)
maps to the index of its nearest allowed value and decodes to that value.

All arithmetic is float32 (actions are float32 in RLDS), and a token is defined
by comparisons only: token = number of the dimension's float32 bin edges that
are <= x. The numpy and jax paths run the same comparison search, so they agree
bit for bit, and no floor() of a rounded quotient decides a bin near its edge.
Construction checks that every bin is resolvable in float32, which makes
`encode(decode(t)) == t` hold for every token.

The spec (`to_spec()`) fully determines encode/decode, bounds resolved from
dataset statistics included, and is stored in every checkpoint.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from qsft_vla.robot import ACTION_KINDS, ActionDim, RobotSpec

SPEC_FORMAT = "qsft_vla.action_tokenizer"
SPEC_VERSION = 1
OUT_OF_BOUNDS_POLICIES = ("clip", "reject")
# A discrete value counts as in bounds up to this far beyond the first/last
# value, relative to the largest |value| (at least absolute): about 8 float32
# ulps, so values that went through float32 storage are never flagged.
DISCRETE_TOLERANCE = 1e-6

_SPEC_FIELDS = ("format", "version", "out_of_bounds", "dims")
_DIM_FIELDS = ("name", "kind", "bins", "low", "high", "values", "labels")


class ActionSpecError(ValueError):
  """The tokenizer spec (or the bounds/statistics it is built from) is invalid."""


class ActionValueError(ValueError):
  """An action or token array given to encode/decode is invalid."""


class NonFiniteActionError(ActionValueError):
  """An action contains NaN or Inf; always rejected, whatever the policy."""


class ActionOutOfBoundsError(ActionValueError):
  """An action lies outside its dimension's bounds under the "reject" policy."""


class ActionTokenizer:
  """Encodes actions [..., D] to int32 tokens [..., D] and decodes them back.

  Token ids of dimension d are 0..bins_d - 1 in the shared action-token space
  of size `vocab_size` (= max bins); `valid_mask()` marks the usable ids.

  Out-of-bound actions (continuous: outside [low, high]; discrete: beyond the
  first/last value by more than DISCRETE_TOLERANCE) are clipped to the nearest
  end and counted in `out_of_bounds_count` under the "clip" policy, or raise
  ActionOutOfBoundsError under "reject". NaN/Inf always raise in `encode`.
  """

  def __init__(self, dims: Sequence[ActionDim], out_of_bounds: str = "clip"):
    """`dims` must all be bounded (use `from_robot` to take bounds from statistics)."""
    if out_of_bounds not in OUT_OF_BOUNDS_POLICIES:
      raise ActionSpecError(f"out_of_bounds must be one of {OUT_OF_BOUNDS_POLICIES}, "
                            f"got {out_of_bounds!r}")
    dims = tuple(dims)
    if not dims:
      raise ActionSpecError("an action tokenizer needs at least one action dimension")
    self._dims = tuple(_checked_dim(d, i) for i, d in enumerate(dims))
    names = [d.name for d in self._dims]
    if len(set(names)) != len(names):
      raise ActionSpecError(f"action dimension names must be unique, got {names}")
    self._policy = out_of_bounds
    self._build_tables()
    self._oob_count = np.zeros(len(self._dims), np.int64)

  # ------------------------------------------------------------------------- #
  # Construction.

  @classmethod
  def from_robot(cls, spec: RobotSpec, stats: Mapping[str, Any] | None = None,
                 out_of_bounds: str | None = None) -> "ActionTokenizer":
    """Builds the tokenizer of a robot; unbounded continuous dims take their
    bounds from `stats["action"]["q01"]` / `["q99"]` (one entry per dimension).
    `out_of_bounds` overrides the robot's policy."""
    q01 = q99 = None
    dims = []
    for i, d in enumerate(spec.action_dims):
      if d.bounded:
        dims.append(d)
        continue
      if q01 is None:
        q01, q99 = _action_quantiles(stats, spec.action_dims, d, i)
      low, high = float(q01[i]), float(q99[i])
      if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ActionSpecError(
            f"action dimension {d.name!r} (index {i}): dataset statistics give q01={low} and "
            f"q99={high}; need finite q01 < q99 (a constant dimension needs low/high set in "
            "the robot config)")
      dims.append(ActionDim(d.name, d.kind, d.bins, low=low, high=high))
    return cls(dims, out_of_bounds=spec.out_of_bounds if out_of_bounds is None else out_of_bounds)

  @classmethod
  def from_spec(cls, spec: Mapping[str, Any]) -> "ActionTokenizer":
    """Inverse of `to_spec`; checks every field and fails naming the bad one."""
    at = "action tokenizer spec"
    if not isinstance(spec, Mapping):
      raise ActionSpecError(f"{at} must be a dict, got {type(spec).__name__}")
    _check_fields(spec, _SPEC_FIELDS, at)
    if spec["format"] != SPEC_FORMAT:
      raise ActionSpecError(f"{at}: format must be {SPEC_FORMAT!r}, got {spec['format']!r}")
    if spec["version"] != SPEC_VERSION or isinstance(spec["version"], bool):
      raise ActionSpecError(f"{at}: unknown version {spec['version']!r}; this code reads "
                            f"version {SPEC_VERSION}")
    dims_in = spec["dims"]
    if not isinstance(dims_in, (list, tuple)) or not dims_in:
      raise ActionSpecError(f"{at}: dims must be a non-empty list, got {dims_in!r}")
    dims = []
    for i, d in enumerate(dims_in):
      where = f"{at}: dims[{i}]"
      if not isinstance(d, Mapping):
        raise ActionSpecError(f"{where} must be a dict, got {d!r}")
      _check_fields(d, _DIM_FIELDS, where)
      if not isinstance(d["bins"], int) or isinstance(d["bins"], bool):
        raise ActionSpecError(f"{where}.bins must be an integer, got {d['bins']!r}")
      for key in ("low", "high"):
        if d[key] is not None and not _is_number(d[key]):
          raise ActionSpecError(f"{where}.{key} must be a number or null, got {d[key]!r}")
      values, labels = d["values"], d["labels"]
      if values is not None:
        if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
          raise ActionSpecError(f"{where}.values must be a list of numbers or null, got {values!r}")
        values = tuple(float(v) for v in values)
      if labels is not None:
        if not isinstance(labels, (list, tuple)) or not all(isinstance(s, str) for s in labels):
          raise ActionSpecError(f"{where}.labels must be a list of strings or null, got {labels!r}")
        labels = tuple(labels)
      dims.append(ActionDim(
          name=d["name"], kind=d["kind"], bins=d["bins"],
          low=None if d["low"] is None else float(d["low"]),
          high=None if d["high"] is None else float(d["high"]),
          values=values, labels=labels))
    try:
      return cls(dims, out_of_bounds=spec["out_of_bounds"])
    except ActionSpecError as e:
      raise ActionSpecError(f"{at}: {e}") from None

  @classmethod
  def from_json(cls, text: str) -> "ActionTokenizer":
    try:
      spec = json.loads(text)
    except (TypeError, ValueError) as e:
      raise ActionSpecError(f"action tokenizer spec is not valid JSON: {e}") from None
    return cls.from_spec(spec)

  def to_spec(self) -> dict[str, Any]:
    """Plain-JSON description that fully determines encode/decode."""
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "out_of_bounds": self._policy,
        "dims": [{"name": d.name, "kind": d.kind, "bins": d.bins, "low": d.low, "high": d.high,
                  "values": None if d.values is None else list(d.values),
                  "labels": None if d.labels is None else list(d.labels)}
                 for d in self._dims],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_spec(), sort_keys=True, allow_nan=False)

  def __eq__(self, other):
    if not isinstance(other, ActionTokenizer):
      return NotImplemented
    return self.to_spec() == other.to_spec()

  __hash__ = None  # mutable (the out-of-bounds counter); equality is by spec

  def __repr__(self):
    dims = ", ".join(
        f"{d.name}:{d.kind}[{d.low}, {d.high}]x{d.bins}" if d.kind == "continuous"
        else f"{d.name}:{d.kind}{list(d.values)}" for d in self._dims)
    return f"ActionTokenizer({dims}; out_of_bounds={self._policy})"

  # ------------------------------------------------------------------------- #
  # Properties.

  @property
  def dims(self) -> tuple[ActionDim, ...]:
    """The resolved dimensions (continuous bounds always set)."""
    return self._dims

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(d.name for d in self._dims)

  @property
  def num_dims(self) -> int:
    return len(self._dims)

  @property
  def bins_per_dim(self) -> tuple[int, ...]:
    return tuple(d.bins for d in self._dims)

  @property
  def vocab_size(self) -> int:
    """Size of the shared action-token space: the largest bin count."""
    return max(self.bins_per_dim)

  @property
  def out_of_bounds(self) -> str:
    return self._policy

  @property
  def bin_width(self) -> np.ndarray:
    """float64[D]: (high - low) / bins for continuous dims, NaN for discrete ones."""
    return np.array([(d.high - d.low) / d.bins if d.kind == "continuous" else np.nan
                     for d in self._dims], np.float64)

  @property
  def bounds(self) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32[D] that decoded actions lie in: continuous low/high,
    discrete first/last value. Encode treats these float32 values as in bounds."""
    return self._clip_low.copy(), self._clip_high.copy()

  @property
  def out_of_bounds_count(self) -> np.ndarray:
    """int64[D]: values clipped per dimension by numpy `encode` since the last reset."""
    return self._oob_count.copy()

  def reset_out_of_bounds_count(self) -> None:
    self._oob_count[:] = 0

  def valid_mask(self) -> np.ndarray:
    """bool[D, vocab_size]: True where the token id is a bin of that dimension."""
    return np.arange(self.vocab_size)[None, :] < np.array(self.bins_per_dim)[:, None]

  # ------------------------------------------------------------------------- #
  # numpy path: validates its input.

  def validate(self, actions) -> np.ndarray:
    """Checks shape, dtype and finiteness (and the bounds under "reject");
    returns the actions as an array. Run it before the jax path, which cannot raise."""
    a = np.asarray(actions)
    if a.dtype.kind not in "biuf":
      raise ActionValueError(f"actions must be numeric, got dtype {a.dtype}")
    self._check_last_axis(a.shape, "actions")
    if a.dtype.kind == "f":
      bad = ~np.isfinite(a)
      if bad.any():
        idx = _first_index(bad)
        raise NonFiniteActionError(
            f"action dimension {self._dims[idx[-1]].name!r} (index {idx[-1]}): non-finite "
            f"value {a[idx]} at actions{list(idx)}")
    if self._policy == "reject":
      oob = self._out_of_bounds(self._as_f32(a))
      if oob.any():
        idx = _first_index(oob)
        d = idx[-1]
        raise ActionOutOfBoundsError(
            f"action dimension {self._dims[d].name!r} (index {d}): value {a[idx]} at "
            f"actions{list(idx)} is outside the bounds {self._describe_bounds(d)} "
            "(out_of_bounds policy 'reject')")
    return a

  def encode(self, actions) -> np.ndarray:
    """float[..., D] -> int32[..., D]. Raises on NaN/Inf; clips and counts or
    rejects out-of-bound values, per the policy."""
    x = self._as_f32(self.validate(actions))
    if self._policy == "clip":
      self._oob_count += self._out_of_bounds(x).reshape(-1, self.num_dims).sum(0)
    x = np.clip(x, self._clip_low, self._clip_high)
    return _bin_index(np, x, self._edges_flat, self._edges_per_dim)

  def decode(self, tokens) -> np.ndarray:
    """int[..., D] -> float32[..., D]; raises on a token outside its dimension's bins."""
    t = np.asarray(tokens)
    if t.dtype.kind not in "iu":
      raise ActionValueError(f"tokens must be integers, got dtype {t.dtype}")
    self._check_last_axis(t.shape, "tokens")
    bad = (t < 0) | (t >= np.array(self.bins_per_dim))
    if bad.any():
      idx = _first_index(bad)
      d = idx[-1]
      raise ActionValueError(
          f"action dimension {self._dims[d].name!r} (index {d}): token {t[idx]} at "
          f"tokens{list(idx)} is not in [0, {self._dims[d].bins})")
    flat = self._table_offsets + t.astype(np.int64)
    return self._decode_flat[flat]

  # ------------------------------------------------------------------------- #
  # jax path: pure jnp ops, jit-compatible, never raises on values.

  def encode_jax(self, actions):
    """float[..., D] -> int32[..., D] in jax. Cannot raise on values, so it
    clips out-of-bound values (uncounted, whatever the policy), maps +-Inf to
    the last/first bin and NaN to bin 0. Callers `validate` first."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    x = jnp.asarray(actions).astype(jnp.float32)
    self._check_last_axis(x.shape, "actions")
    x = _flush_subnormal(jnp, x)
    x = jnp.clip(x, jnp.asarray(self._clip_low), jnp.asarray(self._clip_high))
    x = jnp.where(jnp.isnan(x), jnp.asarray(self._clip_low), x)
    return _bin_index(jnp, x, jnp.asarray(self._edges_flat), self._edges_per_dim)

  def decode_jax(self, tokens):
    """int[..., D] -> float32[..., D] in jax; tokens are clipped to the dimension's bins."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    t = jnp.asarray(tokens)
    self._check_last_axis(t.shape, "tokens")
    t = jnp.clip(t.astype(jnp.int32), 0, jnp.asarray(self.bins_per_dim, jnp.int32) - 1)
    flat = jnp.asarray(self._table_offsets, jnp.int32) + t
    return jnp.asarray(self._decode_flat)[flat]

  # ------------------------------------------------------------------------- #
  # Internals.

  def _build_tables(self):
    """Per-dim float32 edges, decode values and bounds, padded to vocab_size."""
    vocab, n_dims = self.vocab_size, self.num_dims
    # Interior edges (bins - 1 per dim) padded with +inf: never <= a clipped x.
    edges = np.full((n_dims, vocab - 1), np.inf, np.float32)
    table = np.zeros((n_dims, vocab), np.float32)
    bounds = np.zeros((4, n_dims), np.float32)  # clip low/high, out-of-bounds low/high
    for i, d in enumerate(self._dims):
      if d.kind == "continuous":
        width = (d.high - d.low) / d.bins
        inner = d.low + width * np.arange(1, d.bins)
        centres = d.low + width * (np.arange(d.bins) + 0.5)
        low, high = d.low, d.high
        bounds[:, i] = low, high, low, high
      else:
        v = np.array(d.values, np.float64)
        inner = (v[:-1] + v[1:]) / 2  # a midpoint goes to the upper value
        centres = v
        low, high = v[0], v[-1]
        tol = DISCRETE_TOLERANCE * max(1.0, abs(low), abs(high))
        bounds[:, i] = low, high, low - tol, high + tol
      edges[i, :d.bins - 1] = inner
      table[i, :d.bins] = centres
      all_edges = np.concatenate([[np.float32(low)], edges[i, :d.bins - 1], [np.float32(high)]])
      c = table[i, :d.bins]
      # Each decoded value must sit inside its own float32 bin so that
      # encode(decode(t)) == t; fails for bins narrower than a few float32 ulps.
      if not (np.all(np.diff(all_edges) > 0) and np.all(all_edges[:-1] <= c)
              and np.all(c[:-1] < all_edges[1:-1]) and c[-1] <= all_edges[-1]):
        raise ActionSpecError(
            f"action dimension {d.name!r} (index {i}): {d.bins} bins over [{low}, {high}] "
            "are too narrow to tell apart in float32; use fewer bins or wider bounds")
    self._edges_per_dim = vocab - 1
    self._edges_flat = _flush_subnormal(np, edges.reshape(-1))
    self._decode_flat = table.reshape(-1)
    self._table_offsets = np.arange(n_dims, dtype=np.int64) * vocab
    self._clip_low, self._clip_high, self._oob_low, self._oob_high = _flush_subnormal(np, bounds)

  def _check_last_axis(self, shape, what):
    if len(shape) < 1 or shape[-1] != self.num_dims:
      raise ActionValueError(f"{what} must have shape [..., {self.num_dims}] (one entry per "
                             f"action dimension {list(self.names)}), got {tuple(shape)}")

  @staticmethod
  def _as_f32(a):
    with np.errstate(over="ignore"):  # finite float64 beyond float32 -> inf: out of bounds
      return _flush_subnormal(np, a.astype(np.float32))

  def _out_of_bounds(self, x32):
    return (x32 < self._oob_low) | (x32 > self._oob_high)

  def _describe_bounds(self, i):
    d = self._dims[i]
    if d.kind == "continuous":
      return f"[{d.low}, {d.high}]"
    return f"of the values {list(d.values)}"


def _bin_index(xp, x, edges_flat, edges_per_dim):
  """Number of the dimension's edges <= x, for x [..., D] clipped to its bounds.

  Binary lifting over the padded, sorted edge table: the same exact float32
  comparisons in numpy and jax, vectorised over all dimensions at once.
  """
  n_dims = x.shape[-1]
  offsets = xp.arange(n_dims) * edges_per_dim - 1  # -1: position p tests edge p-1
  pos = xp.zeros(x.shape, xp.int32)
  step = 1 << (edges_per_dim.bit_length() - 1)
  while step:
    cand = pos + step
    take = (cand <= edges_per_dim) & (edges_flat[offsets + xp.minimum(cand, edges_per_dim)] <= x)
    pos = xp.where(take, cand, pos)
    step >>= 1
  return pos.astype(xp.int32)


def _flush_subnormal(xp, x):
  """Subnormals -> 0, as XLA on CPU/GPU does (flush-to-zero): without this a
  tiny negative x would fall on different sides of a 0.0 edge in numpy and jax."""
  return xp.where(xp.abs(x) < np.finfo(np.float32).tiny, xp.zeros((), x.dtype), x)


def _checked_dim(d: ActionDim, i: int) -> ActionDim:
  """Validates one dimension and returns it with canonical Python types."""
  at = f"action dimension {d.name!r} (index {i})"
  if not isinstance(d.name, str) or not d.name:
    raise ActionSpecError(f"action dimension {i}: name must be a non-empty string, got {d.name!r}")
  if d.kind not in ACTION_KINDS:
    raise ActionSpecError(f"{at}: kind must be one of {ACTION_KINDS}, got {d.kind!r}")
  if not isinstance(d.bins, (int, np.integer)) or isinstance(d.bins, bool) or d.bins < 2:
    raise ActionSpecError(f"{at}: bins must be an integer >= 2, got {d.bins!r}")
  if d.kind == "continuous":
    if d.low is None or d.high is None:
      raise ActionSpecError(f"{at}: continuous dimension has no bounds (low={d.low}, "
                            f"high={d.high}); build with ActionTokenizer.from_robot(spec, stats)")
    low, high = float(d.low), float(d.high)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
      raise ActionSpecError(f"{at}: need finite low < high, got low={d.low}, high={d.high}")
    if d.values is not None or d.labels is not None:
      raise ActionSpecError(f"{at}: a continuous dimension has no values/labels")
    return ActionDim(d.name, d.kind, int(d.bins), low=low, high=high)
  if d.low is not None or d.high is not None:
    raise ActionSpecError(f"{at}: a discrete dimension has values, not low/high")
  values = tuple(float(v) for v in (d.values or ()))
  if len(values) < 2 or not all(math.isfinite(v) for v in values):
    raise ActionSpecError(f"{at}: values must list at least two finite numbers, got {d.values!r}")
  if any(a >= b for a, b in zip(values, values[1:])):
    raise ActionSpecError(f"{at}: values must be strictly increasing, got {list(values)}")
  if d.bins != len(values):
    raise ActionSpecError(f"{at}: bins ({d.bins}) must equal the number of values "
                          f"({len(values)})")
  labels = None if d.labels is None else tuple(d.labels)
  if labels is not None and (len(labels) != len(values)
                             or not all(isinstance(s, str) for s in labels)):
    raise ActionSpecError(f"{at}: labels must be {len(values)} strings, got {d.labels!r}")
  return ActionDim(d.name, d.kind, len(values), values=values, labels=labels)


def _action_quantiles(stats, action_dims, d, i):
  """stats["action"]["q01"/"q99"] as float64[D], checked; `d`/`i` is the first
  dimension that needs them (named in the error)."""
  need = (f"action dimension {d.name!r} (index {i}) has no low/high in the robot config, "
          "so its bounds come from dataset statistics")
  if stats is None:
    raise ActionSpecError(f"{need}, but none were given: pass stats with "
                          "stats['action']['q01'] and ['q99'], or set low/high")
  action = stats.get("action") if isinstance(stats, Mapping) else None
  if not isinstance(action, Mapping) or "q01" not in action or "q99" not in action:
    raise ActionSpecError(f"{need}, but the statistics have no action q01/q99 "
                          "(expected stats['action']['q01'] and ['q99'])")
  out = []
  for key in ("q01", "q99"):
    q = np.asarray(action[key], np.float64)
    if q.shape != (len(action_dims),):
      raise ActionSpecError(f"stats['action'][{key!r}] must have one entry per action "
                            f"dimension ({len(action_dims)}), got shape {q.shape}")
    out.append(q)
  return out


def _check_fields(d, fields, where):
  unknown = sorted(set(d) - set(fields), key=str)
  if unknown:
    raise ActionSpecError(f"{where} has unknown field(s) {unknown}; known: {list(fields)}")
  missing = [f for f in fields if f not in d]
  if missing:
    raise ActionSpecError(f"{where} is missing field(s) {missing}")


def _is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
  """Index of the first True in C order."""
  return tuple(int(k) for k in np.unravel_index(int(np.argmax(mask.reshape(-1))), mask.shape))
