"""The house: every import, at module level or inside a function, points down a floor or stays in its room, and none loops.

Floors, lowest first: common/ (errors, labels, atomic writes) -> preprocess/ -> model/ -> postprocess/, training/,
evaluation/ -> process.py. A module may import its own folder and the floors below, never above; and no chain of
imports leads back to where it started. An oracle of its own: the imports are read from the source with `ast`,
not from what Python happened to load.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"common": 0, "preprocess": 1, "model": 2, "postprocess": 3, "training": 3, "evaluation": 3, "process": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    files = [REPO / "process.py", *(p for folder in FLOORS if (REPO / folder).is_dir() for p in (REPO / folder).rglob("*.py"))]
    return {module_name(path): path for path in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in its body (a lazy import inside a function counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def floor_of(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_the_walk_finds_the_rooms_and_their_imports():
    edges = graph()
    assert {"common.errors", "common.labels", "common.atomic", "model.runtimes.contract", "model.runtimes.choice", "process"} <= set(edges)
    assert "model.runtimes.choice" in edges["process"] and "common.errors" in edges["preprocess.io"]


def test_no_import_points_up_a_floor():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets if floor_of(b) > floor_of(a))
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_rooms_on_one_floor_do_not_import_each_other():
    sideways = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                      if floor_of(b) == floor_of(a) and a.split(".")[0] != b.split(".")[0])
    assert not sideways, "imports between rooms of one floor:\n" + "\n".join(sideways)


def test_no_import_loop():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    loops = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                loops.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_no_private_name_is_imported_across_modules():
    private = []
    for name, path in our_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in FLOORS:
                private += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "\n".join(private)
