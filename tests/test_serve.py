"""The policy server (qsft_vla.serve), its client and wire format, driven by the real openpi client.

Every server here binds a free localhost port (port 0) and is stopped at the end
of its test or module, also when the test fails.
"""

import http.client
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import websockets.sync.client
from openpi_client import msgpack_numpy as openpi_msgpack
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus

from checkpoint_fixture import REPO, write_checkpoint
from conftest import ROBOT_HOST_ABSENT, run_without_tensorflow
from qsft_vla import evaluate, wire
from qsft_vla.client import PolicyClient, ServerError, ServerObservationError
from qsft_vla.policy import Controller, TrainedPolicy
from qsft_vla.serve import PolicyServer

PROMPT = "go to the red ball"


def _frames(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)} for _ in range(n)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  run = write_checkpoint(tmp_path_factory.mktemp("serve_qsft"), "babyai", "qsft",
                         **{"learner.beta": 4.0, "learner.extraction": "p",
                            "eval.env": "babyai:BabyAI-GoToLocal-v0",
                            "eval.max_steps": 6, "eval.episodes": 3})
  return TrainedPolicy.load(run)


@pytest.fixture(scope="module")
def server(policy):
  with PolicyServer(policy, port=0) as s:
    yield s


def _raw(server):
  """A bare websocket to the server, its metadata frame read."""
  ws = websockets.sync.client.connect(server.url, compression=None, max_size=None)
  wire.unpack(ws.recv(timeout=30))
  return ws


# ------------------------------------------------------------------- wire

def test_wire_round_trips_openpi_frames():
  obs = {"image": np.arange(12, dtype=np.uint8).reshape(2, 2, 3), "state": np.float32([1.5, -2]),
         "n": np.int64(3), "prompt": "hi", "nested": {"x": [1, None]}}
  ours = wire.unpack(wire.pack(obs))
  theirs = wire.unpack(openpi_msgpack.packb(obs))
  for got in (ours, theirs, openpi_msgpack.unpackb(wire.pack(obs))):
    np.testing.assert_array_equal(got["image"], obs["image"])
    assert got["image"].dtype == np.uint8 and got["state"].dtype == np.float32
    assert got["n"] == 3 and got["prompt"] == "hi" and got["nested"] == {"x": [1, None]}


@pytest.mark.parametrize("frame, match", [
    (b"\xc1", "not a msgpack frame"),
    (msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 5, b"dtype": "<f4",
                    b"shape": [2]}), "needs 8 bytes, got 5"),
    (msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O",
                    b"shape": [1]}), "only bool, int and float"),
    (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4",
                    b"shape": [-1]}), "malformed array"),
    (msgpack.packb({b"__npgeneric__": True, b"data": 1, b"dtype": "<c8"}), "only bool"),
])
def test_wire_refuses_malformed_frames(frame, match):
  with pytest.raises(wire.WireError, match=match):
    wire.unpack(frame)
  with pytest.raises(TypeError, match="object"):
    wire.pack({"x": np.array([object()])})


def test_client_imports_neither_jax_nor_tensorflow():
  out = run_without_tensorflow("""
      from qsft_vla.client import PolicyClient
      print("LIGHT")
  """, absent=ROBOT_HOST_ABSENT + ("jax", "jaxlib", "flax", "orbax"))
  assert "LIGHT" in out


# ------------------------------------------------------------ the protocol

def test_openpi_client_drives_the_policy_like_the_controller(server, policy):
  client = WebsocketClientPolicy("127.0.0.1", server.port)
  meta = client.get_server_metadata()
  assert meta["robot"]["name"] == "babyai" and meta["observation_keys"] == ["image"]
  assert meta["algorithm"] == "qsft" and meta["has_values"] and meta["beta"] == 4.0
  ref = Controller(policy)
  frames = _frames(7)

  def check(reply, obs, step):
    action, info = ref.act(obs, return_info=True)
    assert reply["actions"].shape == (1, 1) and reply["actions"].dtype == np.float32
    np.testing.assert_array_equal(reply["actions"][0], action)
    np.testing.assert_allclose(reply["q"], info["q"], rtol=1e-6)
    assert reply["success_estimate"] == pytest.approx(info["success_estimate"])
    assert reply["episode_step"] == step and reply["server_timing"]["infer_ms"] > 0

  ref.reset(PROMPT)
  for t, obs in enumerate(frames[:4]):  # the prompt on every frame: one episode
    check(client.infer({**obs, "prompt": PROMPT}), obs, t)
  ref.reset("go to the blue key")     # a changed prompt starts an episode
  check(client.infer({**frames[4], "prompt": "go to the blue key"}), frames[4], 0)
  check(client.infer(frames[5]), frames[5], 1)  # no prompt: the episode goes on
  ref.reset("go to the blue key")     # the same prompt with reset: a new episode
  check(client.infer({**frames[6], "prompt": "go to the blue key", "reset": True}), frames[6], 0)
  client._ws.close()  # pylint: disable=protected-access  (openpi's client has no close())


def test_policy_client_is_a_remote_controller(server, policy):
  ref = Controller(policy)
  with PolicyClient("127.0.0.1", server.port) as client:
    assert client.has_p and client.metadata()["checkpoint_step"] == policy.step
    with pytest.raises(RuntimeError, match="reset"):
      client.act(_frames(1)[0])
    for episode in range(2):  # two episodes with one instruction stay apart
      client.reset(PROMPT)
      ref.reset(PROMPT)
      for obs in _frames(3, seed=episode):
        action, info = client.act(obs, return_info=True)
        want, want_info = ref.act(obs, return_info=True)
        np.testing.assert_array_equal(action, want)
        np.testing.assert_allclose(info["q"], want_info["q"], rtol=1e-6)
    assert client.latency_stats()["calls"] == 6
    assert client.last_timing["round_trip_ms"] >= client.last_timing["server_ms"] > 0


def test_bad_requests_get_error_replies_and_the_session_goes_on(server):
  obs = _frames(1)[0]
  ws = _raw(server)
  try:
    def ask(frame):
      ws.send(frame)
      return ws.recv(timeout=30)

    cases = [
        ("text frame", "hello", "ProtocolError: expected a binary"),
        ("garbage", b"\xc1\x00", "ProtocolError: not a msgpack frame"),
        ("a list", wire.pack([1, 2]), "ProtocolError: a request is a map"),
        ("no prompt", wire.pack(obs), "ObservationError: a new episode needs 'prompt'"),
        ("prompt not a string", wire.pack({**obs, "prompt": 3}), "'prompt' must be a string"),
        ("reset not a bool", wire.pack({**obs, "prompt": PROMPT, "reset": "yes"}),
         "ProtocolError: 'reset' must be true or false"),
        ("empty prompt", wire.pack({**obs, "prompt": " "}), "ObservationError: 'prompt'"),
        ("wrong key", wire.pack({"imag": obs["image"], "prompt": PROMPT}),
         "ObservationError: observation: unknown key(s) ['imag']"),
        ("wrong shape", wire.pack({"image": obs["image"][:5], "prompt": PROMPT}),
         "expected shape (56, 56, 3)"),
        ("wrong dtype", wire.pack({"image": obs["image"].astype(np.float32), "prompt": PROMPT}),
         "expected dtype uint8"),
        ("object array", msgpack.packb({"image": {b"__ndarray__": True, b"data": b"",
                                                  b"dtype": "|O", b"shape": [0]}}),
         "ProtocolError: array of dtype object"),
    ]
    for name, frame, want in cases:
      reply = ask(frame)
      assert isinstance(reply, str) and want in reply, (name, reply)
    reply = wire.unpack(ask(wire.pack({**obs, "prompt": PROMPT})))
    assert reply["episode_step"] == 0  # the refused frames never entered the history
    assert wire.unpack(ask(wire.pack(obs)))["episode_step"] == 1
  finally:
    ws.close()


def test_policy_client_raises_what_the_server_refused(server):
  with PolicyClient("127.0.0.1", server.port) as client:
    client.reset(PROMPT)
    with pytest.raises(ServerObservationError, match="unknown key") as e:
      client.act({"camera": _frames(1)[0]["image"]})
    assert isinstance(e.value, ValueError) and e.value.kind == "ObservationError"
    client.act(_frames(1)[0])  # still usable


def test_oversized_and_vanishing_clients_leave_the_others_alone(server):
  before = server.sessions
  with PolicyClient("127.0.0.1", server.port) as steady:
    steady.reset(PROMPT)
    steady.act(_frames(1)[0])
    big = _raw(server)
    big.send(b"\0" * (server.max_message_bytes + 1))
    with pytest.raises(ConnectionClosed) as e:
      big.recv(timeout=30)
    assert e.value.rcvd.code == 1009  # message too big
    for _ in range(5):  # a request, then gone before the reply
      gone = _raw(server)
      gone.send(wire.pack({**_frames(1)[0], "prompt": PROMPT}))
      gone.close()
    assert steady.act(_frames(1)[0]).shape == (1,)
  deadline = time.time() + 10
  while server.sessions > before and time.time() < deadline:
    time.sleep(0.05)
  assert server.sessions == before  # every one of them was closed and forgotten


def test_token_health_check_and_session_limit(policy):
  with PolicyServer(policy, port=0, token="s3cret", max_sessions=1) as server:
    with pytest.raises(InvalidStatus) as e:  # openpi's client, no api_key
      WebsocketClientPolicy("127.0.0.1", server.port)
    assert e.value.response.status_code == 401
    with pytest.raises(PermissionError, match="wrong token"):
      PolicyClient("127.0.0.1", server.port, token="guess")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    first = WebsocketClientPolicy("127.0.0.1", server.port, api_key="s3cret")
    first.infer({**_frames(1)[0], "prompt": PROMPT})
    with pytest.raises(ConnectionError, match="busy"):
      PolicyClient("127.0.0.1", server.port, token="s3cret")
    first._ws.close()  # pylint: disable=protected-access
    deadline = time.time() + 10
    while server.sessions and time.time() < deadline:
      time.sleep(0.05)
    with PolicyClient("127.0.0.1", server.port, token="s3cret") as second:
      second.reset(PROMPT)
      second.act(_frames(1)[0])


def test_bc_policy_serves_no_values(tmp_path):
  bc = TrainedPolicy.load(write_checkpoint(tmp_path / "bc", "babyai", "bc"))
  with PolicyServer(bc, port=0) as server, PolicyClient("127.0.0.1", server.port) as client:
    assert not client.has_p and client.metadata()["beta"] == 0.0
    client.reset(PROMPT)
    action, info = client.act(_frames(1)[0], return_info=True)
    assert action.shape == (1,) and info == {"q": None, "success_estimate": None}


def test_evaluate_through_the_server_gives_the_same_numbers(server, policy, tmp_path):
  local = evaluate.run(os.path.dirname(os.path.dirname(policy.path)), progress=False,
                       video_episodes=0, out_dir=str(tmp_path / "local"))
  remote = evaluate.run(server=f"127.0.0.1:{server.port}", progress=False, video_episodes=0,
                        out_dir=str(tmp_path / "remote"))
  assert remote["json"].endswith("-server.json") and os.path.exists(remote["json"])
  assert remote["episodes"] == local["episodes"] == 3
  strip = lambda eps: [{k: v for k, v in e.items() if k != "video"} for e in eps]  # noqa: E731
  assert strip(remote["per_episode"]) == strip(local["per_episode"])
  assert remote["label"] == local["label"] and remote["checkpoint_step"] == policy.step
  with pytest.raises(ValueError, match="the server's own"):
    evaluate.run(server=f"127.0.0.1:{server.port}", beta=2.0, out_dir=str(tmp_path))
  with pytest.raises(ValueError, match="HOST:PORT"):
    evaluate.run(server="nowhere", out_dir=str(tmp_path))


# ------------------------------------------------------------------ binary

@pytest.mark.slow
def test_serve_binary_with_a_token(policy, tmp_path):
  run = os.path.dirname(os.path.dirname(policy.path))
  token = tmp_path / "token"
  token.write_text("t0ken\n")
  empty = tmp_path / "empty"
  empty.write_text("\n")
  bad = subprocess.run([sys.executable, "-m", "qsft_vla.serve", f"--workdir={run}",
                        f"--token_file={empty}", "--port=0"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 1 and "serve: error: --token_file" in bad.stderr
  assert "empty" in bad.stderr and "Traceback" not in bad.stderr

  proc = subprocess.Popen([sys.executable, "-m", "qsft_vla.serve", f"--workdir={run}",
                           f"--token_file={token}", "--port=0"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    url = None
    for line in proc.stdout:
      if line.startswith("serving on "):
        url = line.split()[2]
        break
    assert url and url.startswith("ws://127.0.0.1:"), proc.stderr.read()
    with PolicyClient(url, token="t0ken") as client:
      client.reset(PROMPT)
      assert client.act(_frames(1)[0]).shape == (1,)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "serve: stopped" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
