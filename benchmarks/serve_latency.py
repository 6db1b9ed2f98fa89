"""Policy-server round trip per act() over loopback vs act() in process.

  .venv/bin/python benchmarks/serve_latency.py [--config=robot_configs/babyai.py:qsft] \
      [--calls=300] [--clients=1,4,16] [--time_limit=60] [--out=benchmarks/results/serve_latency.md]

The policy is the config's model at its initial parameters (latency does not
depend on the weights' values), served by qsft_vla.serve.PolicyServer from this
process on a free localhost port. Each client is its own process (what a robot
is) running qsft_vla.client.PolicyClient: it connects, warms up for 10 acts,
waits for the others at a barrier, then times `calls` acts on random
observations (a new episode every 50), or fewer if `time_limit` seconds run
out. The in-process reference is Controller.act on the same observations,
measured before and after the server runs (both reported: the machine is
shared). Overhead = round-trip p50 with one client minus the in-process p50.
With several clients the acts queue on the one compute worker, so round trips
grow with the number of clients while the server's compute per act does not.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402  (benchmarks/report.py, beside this script)
from qsft_vla import train  # noqa: E402
from qsft_vla.policy import Controller  # noqa: E402
from qsft_vla.serve import PolicyServer  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "robot_configs/babyai.py:qsft", "config spec (file[:variant])")
_CALLS = flags.DEFINE_integer("calls", 300, "timed acts per client (after 10 warm-up acts)")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16"], "concurrent client processes")
_TIME_LIMIT = flags.DEFINE_float("time_limit", 60.0, "seconds of timed acts per client at most")
_OUT = flags.DEFINE_string("out", None, "markdown table to write")

INSTRUCTION = "go to the red ball"
WARMUP = 10


def observations(spec, n: int, seed: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    obs = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8)
           for c in spec.cameras}
    if spec.state_dim:
      obs["state"] = rng.standard_normal(spec.state_dim).astype(np.float32)
    out.append(obs)
  return out


def in_process(ctrl: Controller, obs: list[dict[str, np.ndarray]]) -> np.ndarray:
  times = []
  for i, o in enumerate(obs):
    if i % 50 == 0:
      ctrl.reset(INSTRUCTION)
    start = time.perf_counter()
    ctrl.act(o)
    times.append((time.perf_counter() - start) * 1e3)
  return np.asarray(times)


def client_main(port: int, obs, barrier, time_limit: float, results) -> None:
  """One robot: its own process, only numpy / msgpack / websockets on its import path."""
  from qsft_vla.client import PolicyClient  # pylint: disable=g-import-not-at-top
  with PolicyClient("127.0.0.1", port) as client:
    client.reset(INSTRUCTION)
    for o in obs[:WARMUP]:
      client.act(o)
    barrier.wait()
    round_trip, server = [], []
    deadline = time.perf_counter() + time_limit
    for i, o in enumerate(obs[WARMUP:]):
      if time.perf_counter() > deadline:
        break
      if i % 50 == 0:
        client.reset(INSTRUCTION)
      client.act(o)
      round_trip.append(client.last_timing["round_trip_ms"])
      server.append(client.last_timing["server_ms"])
    results.put((round_trip, server))


def served(policy, spec, n_clients: int, calls: int, time_limit: float):
  ctx = mp.get_context("spawn")  # a fresh interpreter per client, as on a robot
  with PolicyServer(policy, port=0, max_sessions=max(16, n_clients)) as server:
    barrier = ctx.Barrier(n_clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=client_main, daemon=True,
                         args=(server.port, observations(spec, calls + WARMUP, 100 + k),
                               barrier, time_limit, results))
             for k in range(n_clients)]
    try:
      for p in procs:
        p.start()
      barrier.wait(timeout=300)
      start = time.perf_counter()
      out = [results.get(timeout=time_limit + 120) for _ in procs]
      wall = time.perf_counter() - start
      for p in procs:
        p.join(timeout=30)
    finally:
      for p in procs:
        if p.is_alive():
          p.kill()
  round_trip = np.concatenate([np.asarray(r) for r, _ in out])
  server_ms = np.concatenate([np.asarray(s) for _, s in out])
  return round_trip, server_ms, wall


def row(name: str, clients, t: np.ndarray, server_ms=None, wall=None) -> str:
  rate = f"{t.size / wall:.0f}" if wall else f"{1e3 / t.mean():.0f}"
  server = f"{np.percentile(server_ms, 50):.2f}" if server_ms is not None else "-"
  return (f"| {name} | {clients} | {t.size} | {np.percentile(t, 50):.2f} | "
          f"{np.percentile(t, 99):.2f} | {server} | {rate} |")


def main(argv):
  del argv
  cfg = report.load_config(_CONFIG.value)
  cfg.data.dir = cfg.data.dir or "unused"
  setup = train.build(cfg, stats=[None])
  state = setup.init_state(pretrained=False)
  policy = setup.policy.with_params(jax.device_get(setup.learner.inference_params(state)))
  spec = policy.robot
  calls = _CALLS.value
  lines = ["# Policy server: round trip per act() over loopback vs in-process act()", "",
           f"`{' '.join(sys.argv)}`", "",
           f"Machine: {report.machine()}. Model: "
           f"{report.model_summary(cfg.model.name, policy.model_config)}, "
           f"{cfg.learner.algorithm} ({cfg.learner.architecture}), batch 1, initial "
           "parameters. Every client is its own process; the server runs one act at a time.",
           "",
           "| path | clients | acts | p50 ms | p99 ms | server compute p50 ms | acts/s (all clients) |",
           "|---|---|---|---|---|---|---|"]
  ctrl = Controller(policy)
  before = in_process(ctrl, observations(spec, calls, 0))
  lines.append(row("in process (before)", "-", before))
  print(lines[-1], flush=True)
  one = None
  for n in [int(c) for c in _CLIENTS.value]:
    t, server_ms, wall = served(policy, spec, n, calls, _TIME_LIMIT.value)
    one = t if n == 1 else one
    lines.append(row("server, loopback", n, t, server_ms, wall))
    print(lines[-1], flush=True)
  after = in_process(ctrl, observations(spec, calls, 1))
  lines.append(row("in process (after)", "-", after))
  print(lines[-1], flush=True)
  if one is not None:
    ref = np.percentile(np.concatenate([before, after]), 50)
    lines += ["", f"Overhead at one client: round-trip p50 {np.percentile(one, 50):.2f} ms - "
              f"in-process p50 {ref:.2f} ms (both in-process runs) = "
              f"{np.percentile(one, 50) - ref:.2f} ms (target <= 1 ms)."]
  report.emit("\n".join(lines) + "\n", _OUT.value)


if __name__ == "__main__":
  app.run(main)
