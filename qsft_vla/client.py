"""The robot side of qsft_vla.serve: a policy on another machine, used like the Controller.

  from qsft_vla.client import PolicyClient
  with PolicyClient("gpu-box.local", 8000, token=open("token").read().strip()) as policy:
    print(policy.metadata()["describe"])
    policy.reset("pick up the red ball")
    while not done:
      action = policy.act({"image": camera.read()})          # float32[D]
      action, info = policy.act(obs, return_info=True)       # info: q, success_estimate

act() sends the observation with the instruction as openpi's "prompt" (and
"reset" on the first step after reset(), so two episodes with the same
instruction stay apart); see qsft_vla/wire.py for the frames. A refused
observation raises ServerObservationError (a ValueError, as the Controller's
ObservationError is), any other refusal ServerError; the session stays usable.

Imports numpy, msgpack and websockets only: no JAX, TensorFlow or the model.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Mapping, Optional

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from qsft_vla import wire

LATENCY_WINDOW = 100_000


class ServerError(RuntimeError):
  """The server refused a request; .kind is one of wire.ERROR_KINDS."""

  def __init__(self, kind: str, message: str, url: str):
    super().__init__(f"{url}: {kind}: {message}")
    self.kind, self.message = kind, message


class ServerObservationError(ServerError, ValueError):
  """The server refused the observation or the prompt (fix the input and send again)."""


class PolicyClient:
  """A policy served by qsft_vla.serve, with the Controller's reset / act.

    host: a host name or address, or a full "ws://host:port" URL (port then unused).
    token: the server's --token_file content, if it has one.
    timeout: seconds to connect, and to wait for each reply.
  """

  def __init__(self, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
               timeout: float = 60.0):
    self.url = host if host.startswith(("ws://", "wss://")) else f"ws://{host}:{int(port)}"
    self._timeout = float(timeout)
    headers = {wire.AUTH_HEADER: wire.auth_value(token)} if token else None
    try:
      self._ws = connect(self.url, compression=None, max_size=None, additional_headers=headers,
                         open_timeout=self._timeout)
    except InvalidStatus as e:
      status = e.response.status_code
      body = e.response.body.decode(errors="replace").strip() if e.response.body else ""
      if status == 401:
        raise PermissionError(f"{self.url} refused the connection: {body}") from None
      raise ConnectionError(f"{self.url} refused the connection: HTTP {status} {body}") from None
    except (OSError, TimeoutError) as e:
      raise ConnectionError(f"cannot reach the policy server at {self.url}: {e}") from None
    self._metadata = self._receive()
    if not isinstance(self._metadata, dict) or wire.ACTIONS in self._metadata:
      self.close()
      raise ConnectionError(f"{self.url} is not a qsft_vla / openpi policy server")
    self._instruction: Optional[str] = None
    self._started = False
    self._new_episode = False
    self._round_trip_ms: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
    self._server_ms: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)

  # ------------------------------------------------------------------ info

  def metadata(self) -> dict[str, Any]:
    """What the server sent on connect: robot, observation keys, action bounds,
    algorithm, beta, checkpoint step, the run's eval config, describe()."""
    return dict(self._metadata)

  @property
  def has_p(self) -> bool:
    """Whether the served policy reports values (Q-SFT), like Controller.has_p."""
    return bool(self._metadata.get("has_values"))

  @property
  def instruction(self) -> Optional[str]:
    return self._instruction

  # --------------------------------------------------------------- episode

  def reset(self, instruction: Optional[str] = None) -> None:
    """Starts an episode; the server starts it with the next act(). None: the
    robot's fixed instruction (robots whose config has one)."""
    if instruction is not None and not isinstance(instruction, str):
      raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    self._instruction = instruction
    self._started = self._new_episode = True

  def act(self, observation: Mapping[str, Any], return_info: bool = False):
    """The action float32[D] (or (action, info) as Controller.act) for this observation."""
    if not self._started:
      raise RuntimeError("act() before reset(instruction): start an episode first")
    if not isinstance(observation, Mapping):
      raise TypeError(f"observation must be a dict, got {type(observation).__name__}")
    request = dict(observation)
    if self._instruction is not None:
      request[wire.PROMPT] = self._instruction
    if self._new_episode:
      request[wire.RESET] = True
    start = time.perf_counter()
    try:
      self._ws.send(wire.pack(request))
    except TypeError as e:  # e.g. an object array: nothing was sent
      raise ServerObservationError("ObservationError", f"cannot send the observation: {e}",
                                   self.url) from None
    except ConnectionClosed as e:
      raise ConnectionError(f"{self.url}: the connection is closed ({e})") from None
    reply = self._receive()
    self._round_trip_ms.append((time.perf_counter() - start) * 1e3)
    if not isinstance(reply, dict) or wire.ACTIONS not in reply:
      raise ServerError("ProtocolError", f"a reply without {wire.ACTIONS!r}", self.url)
    self._new_episode = False
    self._server_ms.append(float(reply.get("server_timing", {}).get("infer_ms", np.nan)))
    action = np.array(reply[wire.ACTIONS][0], np.float32)
    if not return_info:
      return action
    q = reply.get("q")
    return action, {"q": None if q is None else np.array(q, np.float32),
                    "success_estimate": reply.get("success_estimate")}

  def _receive(self):
    try:
      frame = self._ws.recv(timeout=self._timeout)
    except TimeoutError:
      raise TimeoutError(f"{self.url}: no reply within {self._timeout:g} s") from None
    except ConnectionClosed as e:
      raise ConnectionError(f"{self.url}: the server closed the connection ({e})") from None
    if isinstance(frame, str):
      kind, message = wire.parse_error(frame)
      cls = ServerObservationError if kind == "ObservationError" else ServerError
      raise cls(kind, message, self.url)
    try:
      return wire.unpack(frame)
    except wire.WireError as e:
      raise ServerError("ProtocolError", f"an undecodable reply: {e}", self.url) from None

  # --------------------------------------------------------------- latency

  def latency_stats(self) -> dict[str, float]:
    """Round trip per act() and the server's compute within it, in milliseconds."""
    rt = np.asarray(self._round_trip_ms, np.float64)
    server = np.asarray(self._server_ms, np.float64)
    if not rt.size:
      nan = float("nan")
      return {"calls": 0, "p50_ms": nan, "p99_ms": nan, "mean_ms": nan, "max_ms": nan,
              "server_p50_ms": nan}
    return {"calls": int(rt.size), "p50_ms": float(np.percentile(rt, 50)),
            "p99_ms": float(np.percentile(rt, 99)), "mean_ms": float(rt.mean()),
            "max_ms": float(rt.max()), "server_p50_ms": float(np.nanpercentile(server, 50))}

  @property
  def last_timing(self) -> dict[str, float]:
    """The last act(): its round trip and the server's compute within it, in milliseconds."""
    if not self._round_trip_ms:
      return {"round_trip_ms": float("nan"), "server_ms": float("nan")}
    return {"round_trip_ms": self._round_trip_ms[-1], "server_ms": self._server_ms[-1]}

  def reset_latency_stats(self) -> None:
    self._round_trip_ms.clear()
    self._server_ms.clear()

  # ------------------------------------------------------------- lifecycle

  def close(self) -> None:
    self._ws.close()

  def __enter__(self) -> "PolicyClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
