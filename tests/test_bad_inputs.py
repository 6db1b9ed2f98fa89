"""The bad-input corpus (tests/bad_inputs/cases.py): every case through the real
binary or the robot-host API, each refused with one clear line naming the place,
nothing of the user's changed and nothing left behind (or, where the case says so,
run on with a warning). One driver process per entry point (harness.py)."""

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
