"""The package's layout: folders by concern, imports running one way (downwards), no circles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cifar100"
# Each layer may import its own folder and the layers below it, never one above.
LAYERS = {
    "cli": 4,
    "__main__": 5,
    "commands": 3,
    "training": 2,
    "data": 1,
    "runfolder": 1,
    "config": 0,
    "errors": 0,
    "preemption": 0,
    "allocator": 0,
}


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of the file, TYPE_CHECKING included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("cifar100", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifar100"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("cifar100"))
        graph[name] = found
    return {m: {i for i in imps if i in graph and i != m} for m, imps in graph.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["cli"]


def test_every_module_sits_in_a_known_layer():
    assert all(m.split(".")[1] in LAYERS for m in _imports() if m != "cifar100")


def test_imports_run_downwards():
    upward = [
        f"{m} imports {i}"
        for m, imps in _imports().items()
        if m != "cifar100"
        for i in imps
        if i != "cifar100" and _layer(i) > _layer(m)
    ]
    assert not upward, upward


def test_no_import_circles():
    graph = _imports()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        seen[module] = 1
        for other in sorted(graph[module]):
            if seen.get(other) == 1:
                return [*path[path.index(other) :], other] if other in path else [module, other]
            if other not in seen and (circle := visit(other, [*path, other])):
                return circle
        seen[module] = 2
        return None

    for module in sorted(graph):
        if module not in seen:
            circle = visit(module, [module])
            assert circle is None, " -> ".join(circle)


MOST_LINES = 50  # issue 30: a function longer than this is read in more than one sitting


def test_no_function_over_fifty_lines():
    """Counted from the `def` line (decorators apart) to the function's last line, docstring included."""
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MOST_LINES
    ]
    assert not long, long
