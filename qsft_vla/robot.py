"""RobotSpec: the typed, validated view of a config's `robot` section.

Everything downstream (tokenizer, dataset schema, pipeline, controller) reads
the robot through this class rather than the raw ConfigDict, so the checks live
in one place and a bad field fails once, at load, with its name. TF-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qsft_vla.errors import ConfigError

ACTION_KINDS = ("continuous", "discrete")

_ACTION_DIM_FIELDS = {"kind", "low", "high", "bins", "values", "labels"}
_RLDS_KEY_FIELDS = {"cameras", "state", "action", "reward", "discount", "is_first",
                    "is_last", "is_terminal", "language_instruction"}


@dataclasses.dataclass(frozen=True)
class ActionDim:
  name: str
  kind: str                       # "continuous" | "discrete"
  bins: int                       # number of tokens for this dimension
  low: float | None = None        # continuous: None = from dataset quantiles
  high: float | None = None
  values: tuple[float, ...] | None = None   # discrete: the allowed values
  labels: tuple[str, ...] | None = None     # discrete: human-readable names

  @property
  def bounded(self) -> bool:
    return self.kind == "discrete" or (self.low is not None and self.high is not None)


@dataclasses.dataclass(frozen=True)
class Camera:
  name: str
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class RobotSpec:
  name: str
  control_hz: float
  cameras: tuple[Camera, ...]
  state_dim: int
  instruction_source: str
  instruction_text: str
  action_dims: tuple[ActionDim, ...]
  out_of_bounds: str
  rlds_keys: Mapping[str, Any]    # canonical key -> RLDS path; "cameras" -> {name: path}

  @property
  def action_dim(self) -> int:
    return len(self.action_dims)

  @property
  def camera_names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.cameras)

  @classmethod
  def from_config(cls, r, where: str = "config") -> "RobotSpec":
    """Builds and checks the spec from a `robot` ConfigDict (or plain dict)."""
    r = _as_dict(r)
    at = f"{where}: robot"

    def need(cond, msg):
      if not cond:
        raise ConfigError(f"{at}.{msg}")

    need(isinstance(r.get("name"), str) and r["name"] and r["name"] != "<required>",
         "name must be set")
    cams = r.get("cameras") or {}
    need(isinstance(cams, Mapping) and cams, "cameras must name at least one camera")
    cameras = []
    for cam_name in sorted(cams):
      c = cams[cam_name]
      need(isinstance(c, Mapping) and set(c) == {"height", "width"},
           f"cameras.{cam_name} must have exactly height and width, got {c!r}")
      need(all(isinstance(c[k], int) and c[k] > 0 for k in ("height", "width")),
           f"cameras.{cam_name} height/width must be positive integers, got {c!r}")
      cameras.append(Camera(cam_name, c["height"], c["width"]))
    need(isinstance(r.get("state_dim"), int) and r["state_dim"] >= 0,
         f"state_dim must be an integer >= 0, got {r.get('state_dim')!r}")
    instr = r.get("instruction") or {}
    need(instr.get("source") in ("step", "fixed"),
         f"instruction.source must be 'step' or 'fixed', got {instr.get('source')!r}")
    need(instr["source"] != "fixed" or instr.get("text"),
         "instruction.text must be set when instruction.source is 'fixed'")

    action = r.get("action") or {}
    names = tuple(action.get("names") or ())
    dims_cfg = action.get("dims") or {}
    need(names, "action.names must list the action dimensions in token order")
    need(len(set(names)) == len(names), f"action.names has duplicates: {names}")
    need(set(names) == set(dims_cfg),
         f"action.names {sorted(names)} and action.dims {sorted(dims_cfg)} must name the same "
         "dimensions")
    dims = [_action_dim(n, dims_cfg[n], f"{at}.action.dims.{n}") for n in names]
    need(action.get("out_of_bounds") in ("clip", "reject"),
         f"action.out_of_bounds must be 'clip' or 'reject', got {action.get('out_of_bounds')!r}")

    keys = dict(r.get("rlds_keys") or {})
    unknown = set(keys) - _RLDS_KEY_FIELDS
    need(not unknown, f"rlds_keys has unknown field(s) {sorted(unknown)}")
    cam_keys = dict(keys.get("cameras") or {})
    for cam in cameras:
      cam_keys.setdefault(cam.name, f"observation/{cam.name}")
    extra = set(cam_keys) - {c.name for c in cameras}
    need(not extra, f"rlds_keys.cameras names unknown camera(s) {sorted(extra)}")
    keys["cameras"] = cam_keys

    return cls(name=r["name"], control_hz=float(r.get("control_hz") or 0.0),
               cameras=tuple(cameras), state_dim=r["state_dim"],
               instruction_source=instr["source"], instruction_text=instr.get("text") or "",
               action_dims=tuple(dims), out_of_bounds=action["out_of_bounds"],
               rlds_keys=keys)

  def to_dict(self) -> dict[str, Any]:
    """Plain-JSON form; `from_config(spec.to_dict()['robot'])` round-trips."""
    return {"robot": {
        "name": self.name, "control_hz": self.control_hz,
        "cameras": {c.name: {"height": c.height, "width": c.width} for c in self.cameras},
        "state_dim": self.state_dim,
        "instruction": {"source": self.instruction_source, "text": self.instruction_text},
        "action": {
            "names": [d.name for d in self.action_dims],
            "dims": {d.name: {"kind": d.kind, "low": d.low, "high": d.high, "bins": d.bins,
                              "values": None if d.values is None else list(d.values),
                              "labels": None if d.labels is None else list(d.labels)}
                     for d in self.action_dims},
            "out_of_bounds": self.out_of_bounds},
        "rlds_keys": {k: (dict(v) if isinstance(v, Mapping) else v)
                      for k, v in self.rlds_keys.items()},
    }}


def _action_dim(name: str, d, at: str) -> ActionDim:
  d = _as_dict(d)
  unknown = set(d) - _ACTION_DIM_FIELDS
  if unknown:
    raise ConfigError(f"{at} has unknown field(s) {sorted(unknown)}")
  kind = d.get("kind")
  if kind not in ACTION_KINDS:
    raise ConfigError(f"{at}.kind must be one of {ACTION_KINDS}, got {kind!r}")
  if kind == "continuous":
    bins = d.get("bins")
    if not isinstance(bins, int) or bins < 2:
      raise ConfigError(f"{at}.bins must be an integer >= 2, got {bins!r}")
    low, high = d.get("low"), d.get("high")
    if (low is None) != (high is None):
      raise ConfigError(f"{at}: set both low and high, or neither (bounds from dataset quantiles)")
    if low is not None and not float(low) < float(high):
      raise ConfigError(f"{at}: low ({low}) must be below high ({high})")
    return ActionDim(name, kind, bins,
                     None if low is None else float(low), None if high is None else float(high))
  values = d.get("values")
  if not values or len(values) < 2:
    raise ConfigError(f"{at}.values must list at least two values, got {values!r}")
  values = tuple(float(v) for v in values)
  if list(values) != sorted(set(values)):
    raise ConfigError(f"{at}.values must be strictly increasing, got {values}")
  labels = d.get("labels")
  if labels is not None and len(labels) != len(values):
    raise ConfigError(f"{at}.labels has {len(labels)} entries for {len(values)} values")
  return ActionDim(name, kind, len(values), values=values,
                   labels=None if labels is None else tuple(labels))


def _as_dict(x) -> dict:
  if hasattr(x, "to_dict"):
    return x.to_dict()
  return dict(x)
