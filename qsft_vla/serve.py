"""Serves a trained policy over a websocket, in openpi's policy protocol.

  python -m qsft_vla.serve --workdir=RUN [--host=127.0.0.1] [--port=8000] \\
      [--token_file=F] [--beta=B] [--extraction=p|ratio|sample] [--checkpoint_step=K]

Robot code written for openpi drives it unchanged:

  from openpi_client.websocket_client_policy import WebsocketClientPolicy
  policy = WebsocketClientPolicy("127.0.0.1", 8000)          # api_key=token with --token_file
  reply = policy.infer({"image": uint8[H, W, 3], "prompt": "go to the red ball"})
  action = reply["actions"][0]                                 # float32[D]

and so does ours (qsft_vla.client.PolicyClient, which imports no JAX). The
frames, keys and episode rules are in qsft_vla/wire.py. Each connection is a
session with its own Controller (its own instruction and observation history)
over one copy of the parameters; acts of all sessions run one at a time on one
worker thread (the device runs one act() at a time anyway), so a slow or
vanished client never blocks the others' frames, only queues behind their
compute.

Safety: bound to localhost unless --host says otherwise (a warning when bound
elsewhere without a token); with --token_file every connection must present the
token (openpi's `Authorization: Api-Key <token>`), else HTTP 401. A frame over
--max_message_bytes closes that connection with code 1009; a malformed frame,
a refused observation or prompt gets an error reply and the session goes on;
at most --max_sessions connections at once (HTTP 503 beyond). Nothing a client
sends can stop the server or reach another session. SIGINT / SIGTERM stop it.

TF-free: imports no TensorFlow, TFDS, Reverb or optax.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import itertools
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from qsft_vla import wire
from qsft_vla.learning import spec as learner_spec
from qsft_vla.policy import Controller, ControllerError, ObservationError, TrainedPolicy

DEFAULT_PORT = 8000  # openpi's default
DEFAULT_MAX_SESSIONS = 16


def default_max_message_bytes(policy: TrainedPolicy) -> int:
  """Four times one observation's bytes (cameras, state, a long prompt), at least 1 MiB."""
  spec = policy.robot
  observation = sum(c.height * c.width * 3 for c in spec.cameras) + 8 * spec.state_dim + 4096
  return max(1 << 20, 4 * observation)


def metadata(controller: Controller) -> dict[str, Any]:
  """The frame a client receives on connect: what the policy acts on and returns."""
  policy, spec = controller.policy, controller.spec
  low, high = controller.action_tokenizer.bounds
  return {
      "protocol": wire.PROTOCOL,
      "robot": spec.to_dict()["robot"],
      "observation_keys": sorted(list(spec.camera_names) + (["state"] if spec.state_dim else [])),
      "action_dim": spec.action_dim,
      "action_low": np.asarray(low, np.float32).tolist(),
      "action_high": np.asarray(high, np.float32).tolist(),
      "algorithm": policy.learner.algorithm,
      "has_values": controller.has_p,
      "extraction": controller.extraction,
      "sampling": controller.sampling,
      "beta": controller.beta,
      "temperature": controller.temperature,
      "checkpoint_step": policy.step,
      "run": os.path.basename(os.path.dirname(os.path.dirname(policy.path or "")))
             or None,
      "eval": dict(policy.config.get("eval") or {}),
      "describe": policy.describe(),
  }


class Session:
  """One connection's episode state: its Controller and the step counter.

  step() turns one request frame into one reply frame (bytes) or an error
  reply (str, wire.error_text); it never raises for anything a client sends."""

  def __init__(self, controller: Controller):
    self.controller = controller
    self.t = 0  # the next step's index in the episode

  def step(self, frame) -> bytes | str:
    if isinstance(frame, str):
      return wire.error_text("ProtocolError", "expected a binary msgpack frame, got text")
    try:
      request = wire.unpack(frame)
    except wire.WireError as e:
      return wire.error_text("ProtocolError", str(e))
    if not isinstance(request, dict):
      return wire.error_text("ProtocolError", "a request is a map of observation keys, "
                             f"{wire.PROMPT!r} and {wire.RESET!r}; got {type(request).__name__}")
    prompt = request.pop(wire.PROMPT, None)
    reset = request.pop(wire.RESET, False)
    if prompt is not None and not isinstance(prompt, str):
      return wire.error_text("ObservationError", f"{wire.PROMPT!r} must be a string, got "
                             f"{type(prompt).__name__}")
    if not isinstance(reset, (bool, np.bool_)):
      return wire.error_text("ProtocolError", f"{wire.RESET!r} must be true or false, got "
                             f"{type(reset).__name__}")
    ctrl = self.controller
    if reset or ctrl.instruction is None or (prompt is not None and prompt != ctrl.instruction):
      if prompt is None and ctrl.spec.instruction_source != "fixed":
        return wire.error_text("ObservationError", f"a new episode needs {wire.PROMPT!r} (the "
                               f"instruction): robot {ctrl.spec.name!r} has no fixed one")
      try:
        ctrl.reset(prompt)
      except (TypeError, ValueError) as e:
        return wire.error_text("ObservationError", f"{wire.PROMPT!r}: {e}")
      self.t = 0
    start = time.perf_counter()
    try:
      action, info = ctrl.act(request, return_info=True)
    except ObservationError as e:
      return wire.error_text("ObservationError", str(e))
    except ControllerError as e:
      return wire.error_text("ControllerError", str(e))
    infer_ms = (time.perf_counter() - start) * 1e3
    reply = {wire.ACTIONS: action[None], "q": info["q"],
             "success_estimate": info["success_estimate"], "episode_step": self.t,
             "server_timing": {"infer_ms": infer_ms}}
    self.t += 1
    return wire.pack(reply)


class PolicyServer:
  """A websocket server of one TrainedPolicy (see the module docstring).

    with PolicyServer(TrainedPolicy.load(run), port=0) as server:  # a free port
      ... PolicyClient("127.0.0.1", server.port) ...

  start() returns once the port is bound (its own thread runs the event loop);
  stop() closes every connection and returns once the port is free.
  """

  def __init__(self, policy: TrainedPolicy, *, host: str = "127.0.0.1",
               port: int = DEFAULT_PORT, token: Optional[str] = None,
               beta: Optional[float] = None, extraction: Optional[str] = None,
               temperature: float = 0.0, seed: int = 0,
               max_message_bytes: Optional[int] = None,
               max_sessions: int = DEFAULT_MAX_SESSIONS):
    if token is not None and not token:
      raise ValueError("token must be a non-empty string (or None: no token)")
    if int(max_sessions) < 1:
      raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    # One copy of the parameters on the device, shared by every session's Controller.
    self._policy = policy.with_params(jax.device_put(dict(policy.params)), step=policy.step,
                                      path=policy.path)
    self._options = dict(beta=beta, extraction=extraction, temperature=temperature)
    self._seed = int(seed)
    # Compiles act() once (warm-up) and checks beta / extraction before any client comes.
    self._first = Controller(self._policy, seed=self._seed, **self._options)
    self.metadata = metadata(self._first)
    self._metadata_frame = wire.pack(self.metadata)
    self.host, self.port = host, int(port)
    self._token = token
    self.max_message_bytes = int(max_message_bytes or default_max_message_bytes(policy))
    self._max_sessions = int(max_sessions)
    self._sessions = 0
    self._count = itertools.count()
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qsft-act")
    self._thread: Optional[threading.Thread] = None
    self._loop: Optional[asyncio.AbstractEventLoop] = None
    self._stop: Optional[asyncio.Event] = None
    self._ready = threading.Event()
    self._error: Optional[BaseException] = None

  # ---------------------------------------------------------------- lifecycle

  def start(self) -> "PolicyServer":
    if self._thread is not None:
      raise RuntimeError("PolicyServer already started")
    self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                    name="qsft-serve", daemon=True)
    self._thread.start()
    self._ready.wait()
    if self._error is not None:
      self._thread.join()
      raise OSError(f"cannot serve on {self.host}:{self.port}: {self._error}") from self._error
    return self

  def stop(self) -> None:
    if self._thread is None:
      return
    if self._loop is not None and self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)
    self._thread.join()
    self._thread = None
    self._executor.shutdown(wait=True)

  def __enter__(self) -> "PolicyServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  @property
  def url(self) -> str:
    return f"ws://{self.host}:{self.port}"

  @property
  def sessions(self) -> int:
    """Connections open now."""
    return self._sessions

  async def _main(self) -> None:
    from websockets.asyncio.server import serve  # pylint: disable=g-import-not-at-top
    self._loop = asyncio.get_running_loop()
    self._stop = asyncio.Event()
    try:
      server = await serve(self._handle, self.host, self.port, compression=None,
                           max_size=self.max_message_bytes, process_request=self._admit)
    except OSError as e:
      self._error = e
      self._ready.set()
      return
    async with server:
      self.port = server.sockets[0].getsockname()[1]
      self._ready.set()
      await self._stop.wait()
      server.close()  # closes every connection (code 1001) and waits for the handlers
      await server.wait_closed()

  def _admit(self, connection, request):
    """The handshake: health checks, the token, the session limit."""
    if request.path == wire.HEALTH_PATH:
      return connection.respond(http.HTTPStatus.OK, "OK\n")
    if self._token is not None:
      given = request.headers.get(wire.AUTH_HEADER, "")
      if not hmac.compare_digest(given.encode(), wire.auth_value(self._token).encode()):
        logging.warning("refused %s: missing or wrong token", _peer(connection))
        return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                  f"missing or wrong token (send '{wire.AUTH_HEADER}: "
                                  f"{wire.AUTH_SCHEME} <token>')\n")
    if self._sessions >= self._max_sessions:
      return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                f"server busy: {self._sessions} sessions open (at most "
                                f"{self._max_sessions})\n")
    return None

  async def _handle(self, ws) -> None:
    from websockets.exceptions import ConnectionClosed  # pylint: disable=g-import-not-at-top
    loop = asyncio.get_running_loop()
    n = next(self._count)
    self._sessions += 1
    peer = _peer(ws)
    steps = 0
    try:
      session = await loop.run_in_executor(self._executor, self._new_session, n)
      await ws.send(self._metadata_frame)
      logging.info("session %d opened by %s", n, peer)
      async for frame in ws:
        reply = await loop.run_in_executor(self._executor, self._step, session, frame)
        await ws.send(reply)
        steps += 1
    except ConnectionClosed as e:
      logging.info("session %d: %s closed the connection (%s)", n, peer, e)
    finally:
      self._sessions -= 1
      logging.info("session %d closed after %d replies", n, steps)

  def _new_session(self, n: int) -> Session:
    if n == 0:
      return Session(self._first)
    return Session(Controller(self._policy, seed=self._seed + n, warmup=False, **self._options))

  @staticmethod
  def _step(session: Session, frame) -> bytes | str:
    try:
      return session.step(frame)
    except Exception as e:  # a bug, not the client's fault: say so, keep serving
      logging.error("internal error in a session: %s", traceback.format_exc())
      return wire.error_text("InternalError", f"{type(e).__name__}: {e}")


def _peer(connection) -> str:
  try:
    host, port = connection.remote_address[:2]
    return f"{host}:{port}"
  except Exception:  # pylint: disable=broad-except
    return "a client"


def read_token(path: str) -> str:
  """The token in `path` (surrounding whitespace dropped); a clear error if unusable."""
  try:
    with open(path) as f:
      token = f.read().strip()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"--token_file {path}: cannot read it ({e})") from None
  if not token:
    raise ValueError(f"--token_file {path}: the file is empty")
  if any(c.isspace() or not c.isprintable() for c in token):
    raise ValueError(f"--token_file {path}: the token must be one word of printable "
                     "characters (it travels in an HTTP header)")
  return token


# ------------------------------------------------------------------ binary

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/ or a step "
                      "directory).", required=True)
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind (localhost by default; "
                      "0.0.0.0 for every interface, with --token_file).")
  flags.DEFINE_integer("port", DEFAULT_PORT, "Port (0: a free one, printed at start).")
  flags.DEFINE_string("token_file", None, "A file holding the token every client must "
                      "present (openpi's api_key).")
  flags.DEFINE_integer("checkpoint_step", None, "Step to serve (default: the latest).")
  flags.DEFINE_float("beta", None, "Q-SFT beta (default: the run's; 0 for BC).")
  flags.DEFINE_enum("extraction", None, list(learner_spec.EXTRACTIONS), "Q-SFT policy "
                    "extraction (default: the run's learner.extraction).")
  flags.DEFINE_float("temperature", 0.0, "0: argmax; > 0: sample.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (session n samples from seed + n).")
  flags.DEFINE_integer("max_sessions", DEFAULT_MAX_SESSIONS, "Connections at once.")
  flags.DEFINE_integer("max_message_bytes", None, "Largest request frame (default: four "
                       "observations' bytes, at least 1 MiB).")


def main(argv) -> int:
  if len(argv) > 1:
    print(f"serve: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 1
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f["verbosity"].present:  # orbax logs every file it restores at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    token = read_token(f.token_file) if f.token_file else None
    policy = TrainedPolicy.load(f.workdir, f.checkpoint_step)
    server = PolicyServer(policy, host=f.host, port=f.port, token=token, beta=f.beta,
                          extraction=f.extraction, temperature=f.temperature, seed=f.seed,
                          max_message_bytes=f.max_message_bytes, max_sessions=f.max_sessions)
    server.start()
  except (ValueError, OSError) as e:  # bad flags, checkpoint (CheckpointError), port in use
    print(f"serve: error: {e}", file=sys.stderr)
    return 1
  if token is None and f.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"serve: WARNING: bound to {f.host} without --token_file: anyone who reaches this "
          "port can drive the robot", file=sys.stderr)
  print(policy.describe())
  print(f"serving on {server.url} ({'token required' if token else 'no token'}; "
        f"{server.metadata['algorithm']}, beta {server.metadata['beta']:g}); "
        "Ctrl-C stops", flush=True)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  while not stop.wait(1.0):
    pass
  server.stop()
  print("serve: stopped", flush=True)
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
