"""The bad-input corpus (tests/bad_inputs/cases.py): every case through the real
binary or the robot-host API, each refused with one clear line naming the place,
nothing of the user's changed and nothing left behind (or, where the case says so,
run on with a warning). One driver process per entry point (harness.py)."""

import os
import time

import pytest

from bad_inputs import cases, fixtures as fixtures_lib, harness


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  return fixtures_lib.make(None, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("entry", harness.ENTRIES)
def test_every_bad_input_is_refused_clearly(entry, fixtures, tmp_path):
  results = harness.run_entry(entry, fixtures, str(tmp_path))
  assert len(results) == sum(c.entry == entry for c in cases.CASES.values())
  wrong = {name: r for name, r in results.items() if r["outcome"] != r["want"]}
  assert not wrong, "\n".join(f"{n}: {r['outcome']}: {r['detail'] or r['message']}"
                              for n, r in wrong.items())



def _raise(error):
  raise error


def _sleep(d):
  time.sleep(60)


def _leave_a_file(d):
  with open(os.path.join(d, "left.txt"), "w") as f:
    f.write("half")
  raise ValueError("named.txt: refused")


def _remove_the_users_file(d):
  os.remove(os.path.join(d, "mine.txt"))
  raise ValueError("named.txt: refused")


def _setup(call, users_file=False):
  def setup(d, fixtures):
    if users_file:
      with open(os.path.join(d, "mine.txt"), "w") as f:
        f.write("the user's")
    return lambda: call(d)
  return setup


@pytest.mark.parametrize("outcome,call,users_file", [
    ("refused", lambda d: _raise(ValueError("named.txt: bad value")), False),
    ("misleading", lambda d: _raise(ValueError("something is wrong")), False),
    ("traceback", lambda d: _raise(KeyError("named.txt")), False),
    ("accepted", lambda d: None, False),
    ("hang", _sleep, False),
    ("left_behind", _leave_a_file, False),
    ("data_loss", _remove_the_users_file, True),
])
def test_the_harness_tells_every_outcome_apart(tmp_path, outcome, call, users_file):
  """Known answers for the classifier, through run_case's fork: only a case that raises
  our kind of error naming the place, changing and leaving nothing, counts as refused."""
  case = cases.Case(outcome, "api", _setup(call, users_file), ("named.txt",), timeout=3)
  result = harness.run_case(case, {}, str(tmp_path))
  assert result["outcome"] == outcome, result
