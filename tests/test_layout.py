"""The package's layout is its architecture: the halves import only from the halves above them.

shared (graphrewrite/*.py but cli.py, and graphrewrite.transforms) <- rewriting/ <- training/ <-
reporting/ <- cli.py. Every import counts, those inside functions too (a lazy import is still a
dependency), and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {"shared": 0, "transforms": 0, "rewriting": 1, "training": 2, "reporting": 3, "cli": 4}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted((ROOT / "graphrewrite").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "transforms").glob("*.py")):
        name = "graphrewrite.transforms" + ("" if path.stem == "__init__" else f".{path.stem}")
        found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["shared"]
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return LAYERS["shared"]  # a top-level shared module


def _imports(path: pathlib.Path) -> set[str]:
    """The graphrewrite modules ``path`` imports (a name imported from a package counts as its
    module when it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("graphrewrite"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphrewrite"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.add(child if child in MODULES else node.module)
    return {m for m in out if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_the_halves_are_folders():
    for half in ("rewriting", "training", "reporting"):
        assert any(m.startswith(f"graphrewrite.{half}.") for m in MODULES), half
    flat = [m for m in MODULES if m.count(".") == 1 and _layer(m) == 0 and m != "graphrewrite.transforms"]
    assert len(flat) <= 10, f"the shared top level grew to {len(flat)} modules: {flat}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_back_up(module):
    if module == "graphrewrite":  # the lazy public names resolve into every half
        return
    upward = sorted(m for m in GRAPH[module] if _layer(m) > _layer(module))
    assert not upward, f"{module} imports {upward} from a later half"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if MODULES[dep].name == "__init__.py":
                continue  # a package re-exporting its modules (the transforms registry) is no cycle
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, name, dep]))
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
