"""The package's import graph: cycles between our modules, counted from the source.

  python scripts/import_graph.py [--top-level]

Reads every module of qsft_vla/ and data_tools/ with `ast` (nothing is
imported), builds the graph of imports between them, and prints each cycle
(strongly connected component). It counts every import, including the deferred
ones inside functions: a deferred import hides a circle from Python's loader but
not from a reader (--top-level counts module-level imports only). Exit status 1
if there is a cycle.
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("qsft_vla", "data_tools")


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
  found = cycles(g)
  print(f"{len(g)} modules, {sum(len(v) for v in g.values())} imports between them, "
        f"{len(found)} cycle(s)")
  for c in found:
    print("  cycle:", " <-> ".join(c))
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
