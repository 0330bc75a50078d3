"""The project's import graph, read from the code (``ast``): which of our modules imports which, line counts, and
import cycles. Lazy imports inside functions count too: they are still dependencies.

    python tests/import_graph.py            # module -> modules it imports, with line counts
    python tests/import_graph.py --cycles   # only the cycles (strongly connected groups of modules)

``tests/test_boundaries.py`` uses it to keep the one-way flow (training -> checkpoint -> blip2 <- app) and to keep
the packages free of import cycles.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("blip2", "training", "app", "research")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:  # Alembic's scripts are loaded by Alembic, not imported
                found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports (``from . import x`` resolves to module ``pkg.x`` when it is one)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        else:
            continue
        for target in targets:
            # The longest of our modules that the target names (``blip2.model.Blip2`` -> ``blip2.model``).
            parts = target.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in known:
                    if candidate != name:
                        out.add(candidate)
                    break
    # A module also needs its package's __init__, which is not a dependency worth drawing.
    return {m for m in out if not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", action="store_true", help="print only the import cycles")
    args = parser.parse_args()
    edges = graph()
    loops = cycles(edges)
    if not args.cycles:
        modules = our_modules()
        for name in sorted(edges):
            lines = len(modules[name].read_text().splitlines())
            print(f"{name:32} {lines:5}  -> {', '.join(sorted(edges[name])) or '-'}")
    print("cycles:", "; ".join(" <-> ".join(group) for group in loops) if loops else "none")


if __name__ == "__main__":
    main()
