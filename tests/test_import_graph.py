"""The layout is the architecture: no import circles, and dependencies point one way.

The graph is read from the source with ``ast`` (every ``import``, top-level or inside a
function, counts: a lazy import is still a dependency), so the test needs no import side
effects and names the offending file and line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedcommons"

#: Shared leaf modules every part may import.
BASE = {"errors", "logs", "fileio", "names"}

#: part -> the parts (besides BASE and itself) it may import; "flwr" marks Flower.
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "tasks": set(),
    "strategies": {"wire"},
    "privacy": {"strategies", "wire"},
    "releases": {"privacy", "strategies", "tasks", "wire"},
    "observability": set(),
    "client_sdk": {"flwr", "privacy", "tasks", "wire"},
    "coordinator": {"flwr", "observability", "privacy", "releases", "strategies", "tasks", "wire"},
    "engines": {"flwr", "client_sdk", "coordinator", "observability", "privacy", "tasks", "wire"},
    "merge": {"client_sdk", "releases", "strategies", "tasks", "wire"},
    "cli": {
        "client_sdk",
        "coordinator",
        "engines",
        "merge",
        "observability",
        "privacy",
        "releases",
        "strategies",
        "tasks",
        "wire",
    },
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute names imported by ``path`` (relative imports resolved), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # ``from pkg import module`` imports the module too
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for name, path in files.items():
        for target, line in _imports(path):
            if target.startswith("flwr"):
                edges[name].add("flwr")
                where.setdefault((name, "flwr"), f"{path.relative_to(SRC)}:{line}")
            elif target in files and target != name:
                edges[name].add(target)
                where.setdefault((name, target), f"{path.relative_to(SRC)}:{line}")
    return edges, where


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedcommons"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_a_circle() -> None:
    edges, _ = _graph()
    # ``from fedcommons.x import y`` also reads the package ``fedcommons.x``'s __init__;
    # a package that re-exports its own modules is not a circle between parts.
    module_edges = {
        a: {b for b in bs if b != "flwr" and not a.startswith(b + ".")} for a, bs in edges.items()
    }
    cycles = _cycles(module_edges)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_parts_import_only_in_the_documented_direction() -> None:
    edges, where = _graph()
    wrong = []
    for module, targets in edges.items():
        part = _part(module)
        if part in BASE or part == "fedcommons":
            continue
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"part {part!r} ({module}) is missing from ALLOWED"
        for target in targets:
            other = "flwr" if target == "flwr" else _part(target)
            if other in BASE or other in {part, "fedcommons"} or other in allowed:
                continue
            wrong.append(f"{where[(module, target)]}: {part} imports {other} ({target})")
    assert not wrong, "imports against the documented direction:\n" + "\n".join(sorted(wrong))


def test_parts_form_no_circle_among_themselves() -> None:
    parts = {part: allowed - {"flwr"} for part, allowed in ALLOWED.items()}
    assert not _cycles(parts)


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        ("strategies", "flwr"),
        ("wire", "flwr"),
        ("releases", "flwr"),
        ("releases", "coordinator"),
        ("strategies", "coordinator"),
    ],
)
def test_offline_parts_never_import_flower_or_the_coordinator(part: str, forbidden: str) -> None:
    assert forbidden not in ALLOWED[part]
    edges, _ = _graph()
    offenders = [
        m
        for m, targets in edges.items()
        if _part(m) == part
        and any((t == "flwr" and forbidden == "flwr") or _part(t) == forbidden for t in targets)
    ]
    assert not offenders


def test_no_folder_holds_more_than_twelve_modules_or_a_quarter_of_the_code() -> None:
    lines = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    total = sum(lines.values())
    for folder in {p.parent for p in lines}:
        modules = [p for p in lines if p.parent == folder and p.name != "__init__.py"]
        share = sum(lines[p] for p in modules) / total
        if folder == PACKAGE:
            continue  # the package root holds the shared leaf modules
        assert len(modules) <= 12, f"{folder.relative_to(SRC)} holds {len(modules)} modules"
        assert share <= 0.25, f"{folder.relative_to(SRC)} holds {share:.0%} of the code"
