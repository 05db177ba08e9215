"""The harness's imports run one way: an import graph over harness/ built with ``ast`` (every
``import`` / ``from ... import`` anywhere in a module, including imports inside functions;
only ``if TYPE_CHECKING:`` blocks, which never run, are left out) has no cycle; within
harness/report/ no renderer imports another, and the backends' orchestration does not
import the package face that re-exports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDERERS = {"harness.report.markdown", "harness.report.html", "harness.report.plots", "harness.report.gallery",
             "harness.report.csv", "harness.report.terminal"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "harness") -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports. ``from a.b import c`` counts as an
    edge to ``a.b.c`` when that is a module, else to ``a.b``; a package's ``__init__`` is its
    own node (importing ``a.b.c`` is not counted as importing ``a.b``: Python runs the
    package face first, but the face importing its children is not a circle of code)."""
    modules = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:  # `if TYPE_CHECKING:` imports never run
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_report_package_imports_run_one_way():
    graph = import_graph()
    report_cycles = [c for c in cycles(graph) if any(m.startswith("harness.report") for m in c)]
    assert report_cycles == []
    for renderer in RENDERERS:
        assert not (graph[renderer] & RENDERERS), f"{renderer} imports another renderer: {graph[renderer] & RENDERERS}"
    assert not any(m.startswith("harness.report") for m in graph["harness.report.store"])
    assert graph["harness.report.leaderboard"] & {m for m in graph if m.startswith("harness.report")} == set()


def test_harness_has_no_import_circle():
    assert cycles(import_graph()) == []


def test_backends_face_and_orchestration():
    graph = import_graph()
    assert "harness.backends.orchestration" in graph["harness.backends"]  # the face re-exports run_sweep
    assert "harness.backends" not in graph["harness.backends.orchestration"]
    for backend in ("harness.backends.local", "harness.backends.ray_backend", "harness.backends.slurm"):
        assert "harness.backends.orchestration" not in graph[backend], backend  # backends submit and watch only
