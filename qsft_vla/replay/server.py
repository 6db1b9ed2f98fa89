"""The replay server: one Reverb table of training examples for a robot config.

  python -m qsft_vla.replay.server --config=robot_configs/babyai.py --port=8000 \
      [--checkpoint_dir=DIR --checkpoint_every=600]

The table's signature is the config's training example (data.examples.example_spec),
so inserters and learners of another robot, window or image size are refused
by Reverb itself. With --checkpoint_dir the server checkpoints its table every
--checkpoint_every seconds and when it stops, and a server started again on
the same folder restores the table from its newest checkpoint. --port=0 picks
a free port; the address is the log line "replay server: serving ...".
SIGINT / SIGTERM stop it (after the last checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from qsft_vla import config as qconfig
from qsft_vla import paths


class ReplayServer:
  """A Reverb server with the config's table; `address` is "localhost:PORT"."""

  def __init__(self, cfg, port: int = 0, checkpoint_dir: Optional[str] = None,
               checkpoint_every: float = 600.0):
    import reverb  # pylint: disable=g-import-not-at-top
    from qsft_vla.replay import table  # pylint: disable=g-import-not-at-top
    qconfig.validate(cfg, where="config")
    self.table_name = cfg.replay.table
    self.checkpoint_dir = checkpoint_dir
    checkpointer = None
    if checkpoint_dir:
      checkpoint_dir = os.path.abspath(checkpoint_dir)
      try:
        paths.check_writable_folder(checkpoint_dir)
      except OSError as e:
        raise OSError(f"--checkpoint_dir={checkpoint_dir}: cannot write there ({e})") from None
      checkpointer = reverb.platform.checkpointers_lib.DefaultCheckpointer(checkpoint_dir)
    if port:
      _check_port_free(port)
    try:
      self._server = reverb.Server(tables=[table.make_table(cfg)], port=port or None,
                                   checkpointer=checkpointer)
    except ValueError as e:  # gRPC's "Failed to BuildAndStart" says nothing of why
      raise OSError(f"--port={port}: the replay server could not start ({e})") from None
    self.port = self._server.port
    self.address = f"localhost:{self.port}"
    self._client = reverb.Client(self.address)
    self._stop = threading.Event()
    self._thread = None
    if checkpoint_dir and checkpoint_every > 0:
      self._thread = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_every,),
                                      daemon=True)
      self._thread.start()

  def size(self) -> int:
    return int(self._client.server_info()[self.table_name].current_size)

  def checkpoint(self) -> Optional[str]:
    """Writes a checkpoint of the table (with --checkpoint_dir); returns its path."""
    if not self.checkpoint_dir:
      return None
    path = self._client.checkpoint()
    logging.info("replay server: checkpointed %d items to %s", self.size(), path)
    return path

  def _checkpoint_loop(self, every: float) -> None:
    while not self._stop.wait(every):
      try:
        self.checkpoint()
      except Exception as e:  # pylint: disable=broad-except
        # A failed periodic checkpoint must not stop serving; the next may succeed.
        logging.warning("replay server: checkpoint failed: %s", e)

  def wait(self) -> None:
    """Serves until stop() (e.g. from a signal handler)."""
    self._stop.wait()

  def stop(self, final_checkpoint: bool = True) -> None:
    if self._server is None:
      return
    self._stop.set()
    if final_checkpoint and self.checkpoint_dir:
      self.checkpoint()
    self._server.stop()
    self._server = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop(final_checkpoint=exc[0] is None)


def _check_port_free(port: int) -> None:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as sock:
    # As gRPC binds: a port a stopped server left in TIME_WAIT is free to it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind(("", port))
    except OSError as e:
      raise OSError(f"--port={port}: already in use or not allowed ({e.strerror})") from None


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "robot config file, robot_configs/<robot>.py[:variant]; the table "
      "comes from its replay section, e.g. --config.replay.max_size=100000", lock_config=True)
  flags.mark_flags_as_required(["config"])
  flags.DEFINE_integer("port", 0, "port on localhost-reachable interfaces; 0 picks a free one")
  flags.DEFINE_string("checkpoint_dir", None, "checkpoint the table here and restore from "
                      "its newest checkpoint at start")
  flags.DEFINE_float("checkpoint_every", 600.0, "seconds between checkpoints")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    server = ReplayServer(f.config, f.port, f.checkpoint_dir, f.checkpoint_every)
  except (qconfig.ConfigError, OSError, ValueError, KeyError) as e:
    print(f"replay.server: error: {e}", file=sys.stderr)
    return 1
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: server._stop.set())  # pylint: disable=protected-access
  logging.info("replay server: serving table %r on %s (%d items)", server.table_name,
               server.address, server.size())
  print(f"replay server: serving {server.address}", flush=True)
  server.wait()
  server.stop()
  logging.info("replay server: stopped")
  return 0


if __name__ == "__main__":
  _define_flags()
  qconfig.exit_on_bad_config_args("replay.server", sys.argv[1:])
  app.run(main)
