"""Several training processes as one: jax.distributed, the primary process, barriers.

  python -m qsft_vla.train ... --coordinator=HOST:PORT --num_processes=N --process_id=I

Every process runs the same binary with the same config and workdir (a shared
filesystem). jax.distributed joins them, and jax.devices() is then every
process's devices: the learner's mesh spans all of them, each process feeds
its share of the global batch (train.batch_size / N examples, from its own
data stream) and the step is one SPMD program. The primary process (index 0)
alone writes what exists once: config.json, metrics, the checkpoint's metadata
and checksums, evaluations. On CPU the processes talk through gloo.
"""

from __future__ import annotations

from typing import Optional

import jax


def initialize(coordinator: Optional[str], num_processes: Optional[int],
               process_id: Optional[int]) -> None:
  """Joins the group; nothing to do for a single process. Call before any jax
  computation (the device list is fixed by the first one)."""
  if not num_processes or num_processes == 1:
    return
  if not coordinator or process_id is None:
    raise ValueError("--num_processes > 1 needs --coordinator=HOST:PORT and --process_id")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  # CPU collectives across processes (jax's default CPU client has none); other
  # backends ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  jax.devices()  # the backends take the raw client when they start: start them first
  _add_key_value_try_get()


class _Client:
  """jax 0.4.34's distributed client plus key_value_try_get, which orbax 0.11
  (the checkpoint writer) calls on every multi-process save and which arrived in
  later jax versions: a non-blocking read, raising JaxRuntimeError when absent."""

  def __init__(self, client):
    self._client = client

  def __getattr__(self, name):
    return getattr(self._client, name)

  def key_value_try_get(self, key: str) -> str:
    return self._client.blocking_key_value_get(key, 1)  # 1 ms: absent -> JaxRuntimeError


def _add_key_value_try_get() -> None:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is not None and not hasattr(client, "key_value_try_get"):
    jax_distributed.global_state.client = _Client(client)


def count() -> int:
  return jax.process_count()


def index() -> int:
  return jax.process_index()


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
