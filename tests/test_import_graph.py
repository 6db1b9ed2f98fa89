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


def test_upward_finds_an_import_of_a_higher_layer():
  g = {"qsft_vla.errors": {"qsft_vla.train"}, "qsft_vla.train": {"qsft_vla.errors"},
       "qsft_vla.mystery": set()}
  up, unranked = import_graph.upward(g)
  assert up == [("qsft_vla.errors", "qsft_vla.train")] and unranked == ["qsft_vla.mystery"]
  assert import_graph.layer("qsft_vla.learning.learner") > import_graph.layer("qsft_vla.policy")
  assert import_graph.layer("qsft_vla.learning.losses") < import_graph.layer("qsft_vla.policy")


def test_every_module_has_a_layer_and_no_import_goes_up():
  """The robot host (policy/) never reaches training, schemas never reach the config, ..."""
  assert import_graph.upward(import_graph.graph()) == ([], [])
