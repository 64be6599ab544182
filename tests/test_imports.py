"""The import graph of `src/`: no circle between modules, counting the imports inside functions
too (a circle hidden in a function still ties the modules together), and no import from a lower
layer to a higher one (docs/architecture.md, "Layers")."""

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
    assert "src.errors" in graph and "src.engine.orchestrator" in graph  # it read the tree
    assert circles(graph) == []


def test_errors_import_nothing_of_src():
    """The error types are the bottom of the graph: every layer may raise them."""
    assert import_graph()["src.errors"] == set()


# Bottom to top; a module imports only from its own layer or lower ones, except that the three
# plug-in packages (PLUGINS) share a layer but do not import each other.
LAYERS = [
    ("src.errors", "src.safe_load", "src.threads", "src.outputs"),
    ("src.data", "src.models"),
    ("src.contract",),
    ("src.algorithms", "src.aggregators", "src.transforms"),
    ("src.engine",),
]
PLUGINS = 3


def layer_of(module: str) -> tuple[int, str]:
    """(layer, package) of a module of src; modules in no layer (the entry points: run, report,
    config checks, loggers) are on top."""
    for level, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return level, package
    return len(LAYERS), module


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module of a higher layer, or of a sibling package."""
    found = []
    for module, imported in graph.items():
        level, package = layer_of(module)
        for other in sorted(imported):
            other_level, other_package = layer_of(other)
            if other_level > level or (
                other_level == level == PLUGINS and other_package != package
            ):
                found.append(f"{module} -> {other}")
    return sorted(found)


def test_the_layer_check_sees_an_upward_and_a_sideways_import():
    graph = {
        "src.contract.sharing": {"src.engine.server"},
        "src.algorithms.x": {"src.aggregators.mean", "src.contract.sharing"},
        "src.run": {"src.engine.server"},
    }
    assert upward_imports(graph) == [
        "src.algorithms.x -> src.aggregators.mean",
        "src.contract.sharing -> src.engine.server",
    ]


def test_no_module_imports_from_a_higher_layer_or_a_sibling_plugin_package():
    assert upward_imports(import_graph()) == []
