"""Runs the bad-input corpus (cases.py) and classifies what every case did.

One driver process per entry point imports the binary's module once (TensorFlow,
jax: seconds); each case then runs in a child forked from it, as `python -m
<module> <argv>` would run (runpy with run_name="__main__"), its stdout and
stderr sent to a file. So a case costs its own work, a fraction of a second, and
its exit status and messages are exactly the binary's. Robot-host API cases
(entry "api") call a function instead; raising one of the package's error types
is their refusal.

Outcomes (the classes the reliability issue counted):
  refused      exit status non-zero, no traceback, the output names every expected
               part, nothing of the user's changed and nothing left behind
  warned       (cases that expect it) exit 0 with the expected warning, e.g. a
               damaged newest checkpoint skipped for the newest intact one
  traceback    a Python traceback in the output, or an error type that is not ours
  accepted     exit 0 without the expected words: the bad input went through silently
  misleading   refused, but the message misses an expected part (the place, what was
               expected)
  data_loss    a file or folder that was there before changed or vanished
  left_behind  a refusal left a new file or folder
  hang         still running at the case's time limit (killed)

  python tests/bad_inputs/harness.py --entry=all --root=DIR
      every entry point (fixtures built in DIR): a table of outcomes per entry point
  python tests/bad_inputs/harness.py --entry=data_tools.convert --fixtures=F.json \
      --root=DIR --out=results.json     (one driver: what run_entry starts)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import resource
import runpy
import signal
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTCOMES = ("refused", "warned", "traceback", "accepted", "misleading", "data_loss",
            "left_behind", "hang")
ENTRIES = ("data_tools.convert", "data_tools.generate", "data_tools.stats",
           "data_tools.validate", "qsft_vla.train", "qsft_vla.evaluate", "qsft_vla.serve",
           "qsft_vla.replay.server", "qsft_vla.replay.insert", "qsft_vla.replay.actor", "api")
# The robot-host API refuses by raising these (our errors derive from them).
API_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def snapshot(root: str) -> dict[str, str]:
  """relative path -> "dir", or the file's size and content hash (symlinks by target)."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(d, name)
      rel = os.path.relpath(path, root)
      if os.path.islink(path):
        out[rel] = "link:" + os.readlink(path)
      elif os.path.isdir(path):
        out[rel] = "dir"
      elif os.path.isfile(path):
        with open(path, "rb") as f:
          out[rel] = f"{os.path.getsize(path)}:{hashlib.sha1(f.read()).hexdigest()}"
      else:
        out[rel] = "special"  # a FIFO: never opened here
  return out


def classify(case, code: int | None, output: str, before: dict, after: dict) -> tuple[str, str]:
  """(outcome, detail) of one finished case."""
  lost = sorted(k for k, v in before.items() if after.get(k) != v)
  if lost:
    return "data_loss", f"changed or removed: {lost[:5]}"
  if code is None:
    return "hang", f"killed after {case.timeout:.0f} s"
  if "Traceback (most recent call last)" in output or code < 0:
    return "traceback", output[-600:]
  missing = [p for p in case.parts if p not in output]
  if code == 0:
    if case.expect == "warned" and not missing:
      new = [k for k in after if k not in before
             and not any(k.startswith(w) for w in case.may_write)]
      return ("left_behind", f"new: {new[:5]}") if new else ("warned", "")
    return "accepted", output[-600:]
  new = sorted(k for k in after if k not in before)
  if new:
    return "left_behind", f"new: {new[:5]}"
  if case.expect == "warned":
    return "misleading", f"refused a case that should run with a warning: {output[-400:]}"
  if missing:
    return "misleading", f"missing {missing} in: {output[-400:]}"
  return "refused", ""


def _child(case, run: Any, log: str) -> None:
  """In the forked child: run the case, exit with its status (never returns)."""
  fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  # Python's streams onto those descriptors (under pytest they are capture objects).
  sys.stdout = open(1, "w", closefd=False)  # pylint: disable=consider-using-with
  sys.stderr = open(2, "w", closefd=False)  # pylint: disable=consider-using-with
  code = 1
  if case.file_size_limit:  # writes past it fail with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_size_limit, case.file_size_limit))
  try:
    if case.entry == "api":
      try:
        run()
        code = 0
      except API_ERRORS as e:
        # Ours, or a bare builtin raised from deep inside; the parts tell them apart.
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    else:
      sys.argv = [case.entry] + list(run)
      # runpy's note that the driver imported the module first (on purpose: once, not per case).
      warnings.filterwarnings("ignore", r".*found in sys\.modules", RuntimeWarning)
      try:
        runpy.run_module(case.entry, run_name="__main__", alter_sys=True)
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
          print(e.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(case, fixtures: dict[str, str], root: str) -> dict[str, Any]:
  where = os.path.join(root, case.name)
  os.makedirs(where)
  run = case.setup(where, fixtures)
  log = os.path.join(root, case.name + ".log")  # beside, not inside, the snapshot
  before = snapshot(where)
  start = time.time()
  pid = os.fork()
  if pid == 0:
    os.chdir(where)
    _child(case, run, log)
  code = None
  while time.time() - start < case.timeout:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      code = os.waitstatus_to_exitcode(status)
      break
    time.sleep(0.01)
  else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
  with open(log, errors="replace") as f:
    output = f.read()
  after = snapshot(where)
  if case.teardown:
    case.teardown(where)
  outcome, detail = classify(case, code, output, before, after)
  return {"entry": case.entry, "outcome": outcome, "want": case.expect, "exit": code,
          "seconds": round(time.time() - start, 2), "detail": detail,
          "message": output.strip().splitlines()[-1] if output.strip() else ""}


def run_entry(entry: str, fixtures: dict[str, str], root: str) -> dict[str, dict]:
  """Runs every case of `entry` in one driver process; name -> result."""
  os.makedirs(root, exist_ok=True)
  spec, out = os.path.join(root, f"{entry}.fixtures.json"), os.path.join(root, f"{entry}.json")
  with open(spec, "w") as f:
    json.dump(fixtures, f)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--entry={entry}",
                         f"--fixtures={spec}", f"--root={os.path.join(root, entry)}",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                        timeout=1800, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  if proc.returncode:
    raise RuntimeError(f"the {entry} driver failed:\n{proc.stderr[-3000:]}")
  with open(out) as f:
    return json.load(f)


def table(results: dict[str, dict[str, dict]]) -> str:
  """Markdown: cases per entry point and outcome."""
  rows = ["| entry point | cases | " + " | ".join(OUTCOMES) + " |",
          "|---|---|" + "---|" * len(OUTCOMES)]
  totals = {o: 0 for o in OUTCOMES}
  for entry, res in results.items():
    counts = {o: sum(r["outcome"] == o for r in res.values()) for o in OUTCOMES}
    for o in OUTCOMES:
      totals[o] += counts[o]
    rows.append(f"| {entry} | {len(res)} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
  rows.append(f"| all | {sum(totals.values())} | " + " | ".join(str(totals[o]) for o in OUTCOMES)
              + " |")
  return "\n".join(rows)


def _all(root: str) -> None:
  """Every entry point, fixtures built here first; prints the table and the failures."""
  sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.dirname(os.path.abspath(__file__))]
  os.environ.setdefault("MUJOCO_GL", "egl")
  import fixtures as fixtures_lib  # pylint: disable=g-import-not-at-top
  fixtures = fixtures_lib.make(os.path.join(root, "fixtures"))
  results = {e: run_entry(e, fixtures, os.path.join(root, "runs")) for e in ENTRIES}
  print(table(results))
  for res in results.values():
    for name, r in res.items():
      if r["outcome"] != r["want"]:
        print(f"- {name}: {r['outcome']}: {(r['detail'] or r['message'])[-300:]}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--entry", required=True, choices=ENTRIES + ("all",))
  parser.add_argument("--root", required=True, help="empty folder for the cases")
  parser.add_argument("--fixtures", help="JSON: fixture name -> path (one entry point)")
  parser.add_argument("--out", help="results JSON (one entry point)")
  parser.add_argument("--cases", default="", help="comma-separated names (default: all)")
  args = parser.parse_args()
  if args.entry == "all":
    _all(args.root)
    return
  sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
  import cases as corpus  # pylint: disable=g-import-not-at-top
  with open(args.fixtures) as f:
    fixtures = json.load(f)
  # Paid once here, not in every child.
  for module in corpus.IMPORTS[args.entry]:
    importlib.import_module(module)
  wanted = set(filter(None, args.cases.split(",")))
  results = {c.name: run_case(c, fixtures, args.root) for c in corpus.CASES.values()
             if c.entry == args.entry and (not wanted or c.name in wanted)}
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
