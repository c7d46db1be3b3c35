"""The import graph of the project's own code: no cycles, and the layers point one way.

Read from the source (every import, also those inside functions or under
TYPE_CHECKING: a lazy import that dodges a cycle is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "agent", "service", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "node_modules" not in p.parts
    }


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a `from pkg import mod` names pkg.mod)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_package_imports() -> None:
    edges = graph()
    assert "service.bridge.app" in edges["cli.bridge"]  # imported inside a function
    assert "service.metrics" in edges["service.bridge.store"]  # `from service import metrics`


def test_no_import_cycle_anywhere_in_the_project() -> None:
    assert cycles(graph()) == []


def test_layers_point_one_way() -> None:
    """schemas <- agent, schemas <- service <- cli: nothing imports upward."""
    allowed = {
        "schemas": {"schemas"},
        "agent": {"schemas", "agent"},
        "service": {"schemas", "service"},
        "cli": {"schemas", "agent", "service", "cli"},
    }
    wrong = sorted(
        (src, dst)
        for src, targets in graph().items()
        for dst in targets
        if dst.split(".")[0] not in allowed[src.split(".")[0]]
    )
    assert wrong == []
