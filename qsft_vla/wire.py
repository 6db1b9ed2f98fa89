"""The policy server's wire format: openpi's websocket policy protocol, defined once.

qsft_vla.serve (the server) and qsft_vla.client (the robot side) both speak it,
and so does openpi's own client (`openpi_client.websocket_client_policy`),
unchanged:

  1. The client opens a websocket (binary frames, no compression). With a
     token, the handshake carries `Authorization: Api-Key <token>` (openpi's
     api_key); a missing or wrong token is refused with HTTP 401 before any
     frame. `GET /healthz` answers 200 without a token.
  2. The server sends one frame: the metadata (a dict, `metadata()` below).
  3. Then, per control step, one request frame in, one reply frame out.
     Request: the observation dict the Controller takes (camera name -> uint8
     [H, W, 3], "state" -> float[S]) plus
       PROMPT ("prompt"): the instruction, openpi's key;
       RESET ("reset"): True to start a new episode with the same prompt.
     Reply (a dict):
       ACTIONS ("actions"): float32[1, D], openpi's action chunk (of one step);
       "q": float32[D] or None, "success_estimate": float or None (the
         Controller's act(..., return_info=True); None without p_theta);
       "episode_step": the step's index in its episode (0: a new episode began);
       "server_timing": {"infer_ms": the server's compute time for this step}.
     A refused request gets a text frame instead: "<Kind>: <message>" (openpi's
     client raises RuntimeError with it; ours raises ServerError with .kind),
     and the session stays open. Kinds: ERROR_KINDS.

Episodes (a session is one connection; it holds one episode at a time):
  - the first request of a connection starts an episode;
  - a request whose prompt differs from the episode's starts a new one;
  - RESET: True starts a new one with the same (or the given) prompt;
  - a request without a prompt continues the episode (a robot whose config
    fixes the instruction may never send one).

Arrays travel as openpi's msgpack extension: a map {b"__ndarray__": True,
b"data": raw bytes, b"dtype": numpy dtype string, b"shape": [...]}, numpy
scalars as {b"__npgeneric__": True, b"data", b"dtype"}. Decoding accepts
booleans, integers and floats only (no object, void or complex dtypes: nothing
in a frame can run code or alias memory) and checks that the shape matches the
bytes.

Imports numpy and msgpack only (the robot side of the package).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL = "qsft_vla.serve/1 (openpi websocket policy protocol)"
PROMPT = "prompt"
RESET = "reset"
ACTIONS = "actions"
AUTH_HEADER = "Authorization"
AUTH_SCHEME = "Api-Key"          # openpi_client sends "Api-Key <api_key>"
HEALTH_PATH = "/healthz"

# The text of an error reply starts with one of these and ": ".
ERROR_KINDS = ("ObservationError",  # the observation or prompt was refused (fix the input)
               "ControllerError",   # the policy refused to act (non-finite logits)
               "ProtocolError",     # not a msgpack map of arrays, a text frame, bad keys
               "InternalError")     # a bug in the server: the session stays usable

_ALLOWED_KINDS = "biuf"  # bool, int, uint, float


class WireError(ValueError):
  """A frame that does not decode to a request: its bytes, arrays or types."""


def _encode(obj):
  if isinstance(obj, np.ndarray):
    if obj.dtype.kind not in _ALLOWED_KINDS:
      raise TypeError(f"cannot send an array of dtype {obj.dtype} (bool, int or float only)")
    return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
  if isinstance(obj, np.generic):
    if obj.dtype.kind not in _ALLOWED_KINDS:
      raise TypeError(f"cannot send a scalar of dtype {obj.dtype}")
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  raise TypeError(f"cannot send a {type(obj).__name__}")


def _decode(obj):
  if b"__ndarray__" in obj:
    try:
      dtype = np.dtype(obj[b"dtype"])
      shape = tuple(int(n) for n in obj[b"shape"])
      data = obj[b"data"]
    except (KeyError, TypeError, ValueError) as e:
      raise WireError(f"malformed array: {e}") from None
    if dtype.kind not in _ALLOWED_KINDS:
      raise WireError(f"array of dtype {dtype}: only bool, int and float arrays are accepted")
    if not isinstance(data, bytes) or any(n < 0 for n in shape):
      raise WireError(f"malformed array (shape {list(shape)}, data {type(data).__name__})")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
      raise WireError(f"array of shape {list(shape)} and dtype {dtype} needs "
                      f"{int(np.prod(shape)) * dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype).reshape(shape)
  if b"__npgeneric__" in obj:
    try:
      dtype = np.dtype(obj[b"dtype"])
    except (KeyError, TypeError) as e:
      raise WireError(f"malformed scalar: {e}") from None
    if dtype.kind not in _ALLOWED_KINDS:
      raise WireError(f"scalar of dtype {dtype}: only bool, int and float are accepted")
    return dtype.type(obj.get(b"data"))
  return obj


def pack(obj: Any) -> bytes:
  """A dict (of arrays, numbers, strings, None, nested dicts and lists) as one frame."""
  return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpack(frame: bytes) -> Any:
  """One frame back to Python objects; WireError when it is not valid msgpack of ours."""
  try:
    return msgpack.unpackb(frame, object_hook=_decode, raw=False)
  except WireError:
    raise
  except Exception as e:  # msgpack's ExtraData, FormatError, StackError, ValueError...
    raise WireError(f"not a msgpack frame ({type(e).__name__}: {e})") from None


def error_text(kind: str, message: str) -> str:
  assert kind in ERROR_KINDS, kind
  return f"{kind}: {message}"


def parse_error(text: str) -> tuple[str, str]:
  """(kind, message) of an error reply; kind "InternalError" if it names none."""
  kind, sep, message = text.partition(": ")
  return (kind, message) if sep and kind in ERROR_KINDS else ("InternalError", text)


def auth_value(token: str) -> str:
  return f"{AUTH_SCHEME} {token}"
