"""The import graph (scripts/import_graph.py): no cycles, and the bottom layer stays at the bottom."""

import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import import_graph  # noqa: E402  pylint: disable=wrong-import-position


def test_cycles_finds_a_known_circle():
  g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert import_graph.cycles(g) == [["a", "b", "c"]]
  assert import_graph.cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles_counting_deferred_imports():
  assert import_graph.cycles(import_graph.graph()) == []


def test_bottom_layer_imports_nothing_of_ours():
  g = import_graph.graph()
  assert g["qsft_vla.errors"] == set()
  # The robot schema sits just above it: the config schema validates through it.
  assert g["qsft_vla.robot"] == {"qsft_vla.errors"}
  # The simulator adapters never load the config layer (it validates env ids through them).
  assert not {m for m in g["qsft_vla.envs"] if m.startswith("qsft_vla.config")}
