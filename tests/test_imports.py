"""The import graph of `src/`: no circle between modules, counting the imports inside functions
too (a circle hidden in a function still ties the modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of src it imports (anywhere in its file)."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src"):
                for alias in node.names:  # `from src.a import b`: module src.a.b, or src.a
                    found.add(
                        f"{node.module}.{alias.name}"
                        if f"{node.module}.{alias.name}" in modules
                        else node.module
                    )
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("src")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_src_is_in_an_import_circle():
    graph = import_graph()
    assert "src.errors" in graph and "src.federated.orchestrator" in graph  # it read the tree
    assert circles(graph) == []


def test_errors_import_nothing_of_src():
    """The error types are the bottom of the graph: every layer may raise them."""
    assert import_graph()["src.errors"] == set()


def test_models_and_data_import_no_algorithm_aggregator_or_engine():
    """The lowest layers: a model or a dataset knows nothing of how it is federated."""
    allowed = ("src.errors", "src.safe_load", "src.models", "src.data")
    for module, imported in import_graph().items():
        if module.startswith(("src.models", "src.data")):
            upward = sorted(m for m in imported if not m.startswith(allowed))
            assert upward == [], f"{module} imports {upward}"
