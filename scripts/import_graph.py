"""The package's import graph: cycles and upward imports between our modules, from the source.

  python scripts/import_graph.py [--top-level] [--layer=MODULE=N ...]

Reads every module of qsft_vla/ and data_tools/ with `ast` (nothing is
imported), builds the graph of imports between them, and prints each cycle
(strongly connected component) and each upward import: a module importing one
of a higher layer (LAYERS below). It counts every import, including the deferred
ones inside functions: a deferred import hides a circle from Python's loader but
not from a reader (--top-level counts module-level imports only). --layer ranks
a module LAYERS does not know (e.g. to count an older tree). Exit status 1 if
there is a cycle, an upward import or a module without a layer.
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("qsft_vla", "data_tools")

# Layers, bottom first; a module may import its own layer and those below. The
# longest matching prefix ranks a module; "qsft_vla" itself is its __init__ only.
LAYERS = {
    # 0: what everything may use
    "qsft_vla": 0, "qsft_vla.errors": 0, "qsft_vla.checksums": 0, "qsft_vla.paths": 0,
    # 1: schemas: a robot, its action tokens, an episode, a learner's settings
    "qsft_vla.robot": 1, "qsft_vla.tokenizers": 1, "qsft_vla.data.episode": 1,
    "qsft_vla.learning.spec": 1, "qsft_vla.wire": 1,
    # 2: components built on the schemas: networks, weights, the Q-SFT math, simulators
    "qsft_vla.weights": 2, "qsft_vla.models": 2, "qsft_vla.learning": 2, "qsft_vla.envs": 2,
    # 3: the config schema, which validates through the components
    "qsft_vla.config": 3,
    # 4: a trained policy on the robot host (or its remote client); data pipelines; evaluation
    "qsft_vla.policy": 4, "qsft_vla.client": 4, "qsft_vla.data": 4, "qsft_vla.evaluation": 4,
    # 5: training and the binaries
    "qsft_vla.learning.learner": 5, "qsft_vla.training": 5, "qsft_vla.train": 5,
    "qsft_vla.evaluate": 5, "qsft_vla.serve": 5, "qsft_vla.replay": 5,
    # 6: the data tools
    "data_tools": 6,
}


def layer(module: str, extra=None):
  """The layer of a module (None if no rule ranks it)."""
  rules = {**LAYERS, **(extra or {})}
  if module in rules:
    return rules[module]
  parts = module.split(".")
  for n in range(len(parts) - 1, 1, -1):   # longest prefix, never "qsft_vla" alone
    if ".".join(parts[:n]) in rules:
      return rules[".".join(parts[:n])]
  return rules.get(parts[0]) if parts[0] != "qsft_vla" else None


def upward(graph: dict[str, set[str]], extra=None) -> tuple[list[tuple[str, str]], list[str]]:
  """(imports of a higher layer as (importer, imported), modules without a layer)."""
  unranked = sorted(m for m in graph if layer(m, extra) is None)
  up = sorted((a, b) for a, deps in graph.items() for b in deps
              if a not in unranked and b not in unranked and layer(b, extra) > layer(a, extra))
  return up, unranked


def modules(root: str = REPO) -> dict[str, str]:
  """{dotted module name: file path} of every module of PACKAGES."""
  out = {}
  for pkg in PACKAGES:
    for d, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(d, f)
          name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[name.removesuffix(".__init__")] = path
  return out


def imports(name: str, path: str, known: dict[str, str], top_level_only: bool) -> set[str]:
  """The modules of `known` that module `name` imports."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in (tree.body if top_level_only else ast.walk(tree)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      # A module importing from its own package (`from qsft_vla.policy import layout`
      # inside qsft_vla/policy/) does not depend on the package's __init__: Python
      # has begun that before the module could run.
      if not name.startswith(base + "."):
        found.add(base)
      found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
  return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      v, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[v] = min(low[v], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        comp = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          comp.append(w)
          if w == v:
            break
        if len(comp) > 1:
          out.append(sorted(comp))
  return out


def graph(top_level_only: bool = False, root: str = REPO) -> dict[str, set[str]]:
  known = modules(root)
  return {m: imports(m, p, known, top_level_only) for m, p in known.items()}


def main(argv: list[str]) -> int:
  g = graph(top_level_only="--top-level" in argv)
  extra = dict((a.split("=", 2)[1], int(a.split("=", 2)[2])) for a in argv
               if a.startswith("--layer="))
  found = cycles(g)
  up, unranked = upward(g, extra)
  print(f"{len(g)} modules, {sum(len(v) for v in g.values())} imports between them, "
        f"{len(found)} cycle(s), {len(up)} upward import(s), {len(unranked)} without a layer")
  for c in found:
    print("  cycle:", " <-> ".join(c))
  for a, b in up:
    print(f"  upward: {a} (layer {layer(a, extra)}) -> {b} (layer {layer(b, extra)})")
  for m in unranked:
    print("  no layer:", m)
  return 1 if (found or up or unranked) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
