"""Check safeckpt's import graph: layering (DESIGN.md) and import circles.

Every ``import``/``from ... import`` of a ``safeckpt`` module anywhere in
``src/safeckpt`` (at module level, in a function, under ``TYPE_CHECKING``: a
lazy import is still a dependency, and an import circle kept alive by one is
still a circle) is an edge from the importing module to the deepest module it
names. Two rules:

- layering: each part of the package may import only the parts listed for it
  in `MAY_IMPORT` (``format`` nothing of ours but ``errors``, ``_version`` and
  ``format``; ``sources`` and ``sinks`` also ``format``; ``ops`` those; ...);
- no circles: no module reaches itself through the edges (strongly connected
  components of more than one module, or a module importing itself).

It prints every edge that breaks a rule and every circle, then a summary, and
exits 1 if it found any (0 otherwise)::

    python scripts/check_layers.py            # violations and circles
    python scripts/check_layers.py --edges    # also every edge, one a line
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict
from typing import Iterator, Optional

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PACKAGE = "safeckpt"

# The parts of the package (the first name below `safeckpt`: a subpackage or a module),
# each with the parts it may import besides itself. From DESIGN.md: format depends on
# nothing of ours but errors (and _version); sources and sinks on format; ops on those;
# training, torch, lightning and the CLI on top. The frameworks adapters and the core
# public functions (api, tensor_spec) sit just above format; the drop-in modules beside
# torch; the package's __init__ (re-exports) above everything.
BASE = {"errors", "_version"}
CORE = BASE | {"format", "frameworks"}
READ_WRITE = CORE | {"api", "tensor_spec", "sources", "sinks"}
ADAPTERS = READ_WRITE | {"ops", "training"}
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "_version": set(),
    "format": BASE,
    "frameworks": BASE | {"format"},
    "api": CORE | {"sinks"},
    "tensor_spec": CORE | {"sinks"},
    "sources": CORE,
    "sinks": CORE,
    "ops": READ_WRITE,
    "training": READ_WRITE | {"ops"},
    "torch": ADAPTERS,
    "numpy": ADAPTERS,
    "flax": ADAPTERS,
    "mlx": ADAPTERS,
    "paddle": ADAPTERS,
    "tensorflow": ADAPTERS,
    "lightning": ADAPTERS | {"torch"},
    "cli": ADAPTERS | {"torch", "numpy", "flax", "mlx", "paddle", "tensorflow", "lightning", "__init__"},
    "__init__": ADAPTERS | {"torch", "numpy", "flax", "mlx", "paddle", "tensorflow", "lightning"},
}


def modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the package."""
    found = {}
    base = os.path.join(root, PACKAGE)
    for directory, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            relative = os.path.relpath(os.path.join(directory, name), root)[:-3].split(os.sep)
            if relative[-1] == "__init__":
                relative = relative[:-1]
            found[".".join(relative)] = os.path.join(directory, name)
    return found


def _resolve(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    """The absolute name `from <level dots><target>` means inside `module`."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def imports(known: dict[str, str], module: str) -> Iterator[tuple[str, int]]:
    """(imported safeckpt module, line) for every import in `module`."""
    path = known[module]
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield _deepest(known, alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                # `from .pkg import name`: name is a submodule, or something defined in pkg
                yield (candidate if candidate in known else _deepest(known, base)), node.lineno


def _deepest(known: dict[str, str], name: str) -> str:
    """The module `name` is, or the deepest package of ours above it (`safeckpt.ops.verify.verifier.verify`
    is a function of `safeckpt.ops.verify.verifier`)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def part(module: str) -> str:
    """The part of the package a module belongs to: ``safeckpt.ops.scan.rules`` -> ``ops``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def edges(known: dict[str, str]) -> dict[tuple[str, str], list[int]]:
    """(importer, imported) -> its lines, for every safeckpt import edge."""
    found: dict[tuple[str, str], set[int]] = defaultdict(set)
    for module in known:
        for target, line in imports(known, module):
            found[(module, target)].add(line)
    return {edge: sorted(lines) for edge, lines in found.items()}


def layer_violations(found: dict[tuple[str, str], list[int]]) -> list[str]:
    """One line per edge from a part to a part it may not import (or from a part `MAY_IMPORT` lacks)."""
    problems = []
    for (source, target), lines in sorted(found.items()):
        have, want = part(source), part(target)
        if have == want:
            continue
        if have not in MAY_IMPORT:
            problems.append(f"{source} -> {target} (line {', '.join(map(str, lines))}): {have} is a part "
                            "scripts/check_layers.py does not know: add it to MAY_IMPORT")
        elif want not in MAY_IMPORT[have]:
            problems.append(f"{source} -> {target} (line {', '.join(map(str, lines))}): "
                            f"{have} may not import {want}")
    return problems


def circles(found: dict[tuple[str, str], list[int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in found:
        graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    result.append(sorted(component))
    return sorted(result)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="print every import edge too")
    args = parser.parse_args(argv)
    known = modules()
    found = edges(known)
    if args.edges:
        for (source, target), lines in sorted(found.items()):
            print(f"edge {source} -> {target} (line {', '.join(map(str, lines))})")
    problems = layer_violations(found)
    loops = circles(found)
    for problem in problems:
        print(f"layer violation: {problem}")
    for loop in loops:
        members = set(loop)
        inside = sorted(f"{s} -> {t}" for (s, t) in found if s in members and t in members)
        print(f"import circle ({len(loop)} modules): {', '.join(loop)}")
        for edge in inside:
            print(f"    {edge}")
    format_out = sorted({target for (source, target) in found
                         if part(source) == "format" and part(target) not in ("format", "errors", "_version")})
    print(f"{len(known)} modules, {len(found)} import edges; format imports of ours outside "
          f"errors/_version/format: {', '.join(format_out) or 'none'}; "
          f"{len(problems)} layer violation(s), {len(loops)} import circle(s)")
    return 1 if problems or loops else 0


if __name__ == "__main__":
    sys.exit(main())
