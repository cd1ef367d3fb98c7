"""Fail when modules of ``services`` import each other in a circle (``make lint`` runs this).

Every import counts, also one inside a function (a lazy import hides a circle, it does not
remove it), except those under ``if TYPE_CHECKING:``, which never run.  Generated code
(``services/_proto``) is left out.  Usage: ``python scripts/check_imports.py [ROOT]``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "services"
GENERATED = "services._proto"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(tree: ast.AST, here: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` (module ``here``) imports."""
    found: set[str] = set()
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _type_checking_only(node)
        for statement in node.body
        for child in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, as the list of modules along it; None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {
        module_name(path, root): path
        for path in sorted((root / PACKAGE).rglob("*.py"))
        if not module_name(path, root).startswith(GENERATED)
    }
    known = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = imported(tree, name, path.name == "__init__.py", known)
        # A module's own package __init__ runs first anyway: not an edge of a circle.
        graph[name] = {e for e in edges if e != name and not name.startswith(f"{e}.")}
    return graph


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path.cwd()
    cycle = find_cycle(import_graph(root))
    if cycle:
        print(f"import circle: {' -> '.join(cycle)}", file=sys.stderr)
        return 1
    print(f"no import circle among the modules of {PACKAGE}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
