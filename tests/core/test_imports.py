"""The tree shows the architecture: the core imports nothing from service/ or workers/, and no import circles.

Read with ``ast`` from the files, so nothing is imported to check it. An import deferred into a function counts:
deferring is how a circle is usually hidden, and the circle is still there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("scaletune", "service", "workers")


def _module_files() -> dict[str, Path]:
    files = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = _module_files()


def _known(name: str) -> str | None:
    """The project module a dotted name lands in (``a.b.func`` -> ``a.b``), or None outside the project."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth; blocks under ``if TYPE_CHECKING`` never do."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _imports(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports; the project writes absolute imports only, so a relative one fails."""
    targets = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: write the import absolute, as the rest of the project does"
            names = [f"{node.module}.{alias.name}" for alias in node.names]  # a submodule, or a name in it
        else:
            names = [alias.name for alias in node.names]
        targets |= {target for target in map(_known, names) if target not in (None, module)}
    return targets


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]], within: tuple[str, ...]) -> list[str] | None:
    """One import circle among the modules of the packages ``within`` (``[a, b, …, a]``), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            if target.split(".")[0] in within and (cycle := visit(target)):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(m for m in graph if m.split(".")[0] in within):
        if cycle := visit(module):
            return cycle
    return None


def test_the_core_imports_nothing_from_service_or_workers(graph: dict[str, set[str]]) -> None:
    leaks = {module: sorted(t for t in targets if t.split(".")[0] in ("service", "workers"))
             for module, targets in graph.items() if module.split(".")[0] == "scaletune"}
    assert {module: targets for module, targets in leaks.items() if targets} == {}


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    assert find_cycle(graph, LAYERS) is None


def test_the_circle_finder_finds_a_deferred_circle() -> None:
    """Guards the check itself: a circle closed by an import inside a function is reported with its path."""
    graph = {"scaletune.a": {"scaletune.b"}, "scaletune.b": {"scaletune.c"}, "scaletune.c": {"scaletune.a"},
             "scaletune.d": {"scaletune.a"}}
    assert find_cycle(graph, ("scaletune",)) == ["scaletune.a", "scaletune.b", "scaletune.c", "scaletune.a"]
    assert find_cycle(graph, ("service",)) is None
    source = "def f():\n    from scaletune.data import registry\n"
    [node] = _runtime_imports(ast.parse(source))
    assert isinstance(node, ast.ImportFrom) and node.module == "scaletune.data"
