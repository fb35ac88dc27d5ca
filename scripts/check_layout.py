#!/usr/bin/env python3
"""Check the package layout rules: import cycles, private imports, layers, sizes.

Run from the repository root (``python scripts/check_layout.py``); exit 0 when every
rule holds, 1 otherwise, with one line per finding.  ``--graph`` also prints the import
graph (module -> modules it imports, lazy imports included).  The test suite runs this
script (tests/unit/test_layout.py), so the rules keep holding.

Rules (the README's "Layout" section states them for people):
- no import cycle between modules of ``discrep``, ``fuse_export`` and ``blockdiff``,
  counting imports inside functions (lazy imports) as well;
- no ``from X import _name`` of another module's private name;
- layers: every module of ``discrep`` belongs to a layer (``LAYERS`` below) and imports
  only modules of its own or a lower layer; ``blockdiff`` and ``fuse_export`` import no
  ``discrep`` module, ``blockdiff`` no ``fuse_export``;
- no function over ``MAX_FUNC`` lines, no module over ``MAX_MODULE`` lines.

Only the standard library is used (ast), so it runs before the venv exists.
"""

import argparse
import ast
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

PACKAGES = ("blockdiff", "fuse_export", "discrep")
MAX_FUNC = 80
MAX_MODULE = 800

# Layer of each subpackage of discrep (by the first component under discrep/): a module
# may import modules of a lower or its own layer.  Sides (journal, source, replica,
# transport) are one level but must not import each other: SIDES lists them.
LAYERS: Dict[str, int] = {
    "core": 0,
    "protocol": 1,
    "journal": 2,
    "source": 2,
    "replica": 2,
    "transport": 2,
    "run": 3,
    "cli": 4,
    "__init__": 0,
    "__main__": 5,
}
SIDES = {"journal", "source", "replica", "transport"}
# A side may use another side's module where the dependency is a real one-way
# relation (the source takes its change list from the journal): (importer, imported).
SIDE_EDGES = {("source", "journal")}


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[:-9] if rel.endswith(".__init__") else rel


def find_modules(root: str) -> Dict[str, str]:
    mods: Dict[str, str] = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in sorted(filenames):
                if fn.endswith(".py"):
                    path = os.path.join(dirpath, fn)
                    mods[module_name(root, path)] = path
    return mods


def resolve(mod: str, is_pkg: bool, level: int, target: Optional[str]) -> str:
    if level == 0:
        return target or ""
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class Findings:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def add(self, text: str) -> None:
        self.lines.append(text)


def imports_of(mod: str, path: str, mods: Dict[str, str],
               found: Findings) -> Set[str]:
    """Modules of ours that ``mod`` imports (lazy ones too); private imports noted."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    out: Set[str] = set()

    def known(name: str) -> Optional[str]:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                k = known(a.name)
                if k:
                    out.add(k)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(mod, is_pkg, node.level, node.module)
            for a in node.names:
                full = base + "." + a.name
                if full in mods:
                    out.add(full)
                    continue
                k = known(base)
                if k:
                    out.add(k)
                if (a.name.startswith("_") and not a.name.startswith("__")
                        and k is not None and k != mod):
                    found.add(f"private import: {mod} imports {a.name} from {k}")
    out.discard(mod)
    return out


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(mod: str) -> Tuple[str, Optional[int]]:
    parts = mod.split(".")
    if parts[0] != "discrep":
        return parts[0], -1
    if len(parts) == 1:
        return "__init__", 0
    return parts[1], LAYERS.get(parts[1])


def check_layers(graph: Dict[str, Set[str]], found: Findings) -> None:
    for mod, deps in sorted(graph.items()):
        top = mod.split(".")[0]
        name, lvl = layer_of(mod)
        if top != "discrep":
            for d in sorted(deps):
                dtop = d.split(".")[0]
                if dtop == "discrep" or (top == "blockdiff" and dtop == "fuse_export"):
                    found.add(f"layer: leaf {mod} imports {d}")
            continue
        if lvl is None:
            found.add(f"layer: {mod} is in no layer (add its subpackage to LAYERS)")
            continue
        for d in sorted(deps):
            dname, dlvl = layer_of(d)
            if dlvl is None or dlvl == -1 or dname == name:
                continue
            if dlvl > lvl:
                found.add(f"layer: {mod} ({name}) imports {d} ({dname}), a higher layer")
            elif (dlvl == lvl and name in SIDES and dname in SIDES
                  and (name, dname) not in SIDE_EDGES):
                found.add(f"layer: side {name} imports side {dname} ({mod} -> {d})")


def check_sizes(mods: Dict[str, str], found: Findings) -> None:
    for mod, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        n = text.count("\n")
        if n > MAX_MODULE:
            found.add(f"size: module {mod} has {n} lines (max {MAX_MODULE})")
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNC:
                    found.add(f"size: {mod}.{node.name} has {length} lines "
                              f"(max {MAX_FUNC}) at {path}:{node.lineno}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--graph", action="store_true", help="print the import graph too")
    ap.add_argument("--no-layers", action="store_true", help="skip the layer rule")
    ap.add_argument("--no-sizes", action="store_true", help="skip the size rules")
    a = ap.parse_args(argv)
    mods = find_modules(a.root)
    found = Findings()
    graph = {m: imports_of(m, p, mods, found) for m, p in mods.items()}
    if a.graph:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    for comp in cycles(graph):
        found.add("cycle: " + " <-> ".join(comp))
    if not a.no_layers:
        check_layers(graph, found)
    if not a.no_sizes:
        check_sizes(mods, found)
    for line in found.lines:
        print(line)
    print(f"check_layout: {len(mods)} modules, {sum(map(len, graph.values()))} imports, "
          f"{len(found.lines)} findings")
    return 1 if found.lines else 0


if __name__ == "__main__":
    sys.exit(main())
