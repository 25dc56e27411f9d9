"""The floors of the package, read from the source: every import of every module (function-local ones included)
runs downward, and no two modules import each other, directly or around a circle.

Floors, bottom up: compiler/ → passes/ and backends/ (never each other) → api.py (with budget.py, the accuracy
budget it holds) → autotune.py → the package
face (fxforge/__init__.py) and zoo.py (trained models and data, beside it) → bench.py, demo.py → cli.py →
__main__.py. An import runs upward when it names a module on a higher floor, or on the same floor in another
house (passes ↔ backends). Imports under ``if TYPE_CHECKING:`` never run
and are not counted.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fxforge"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _runs(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only; never executed)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return out


def imports(name: str) -> set[str]:
    """The fxforge modules ``name`` imports anywhere in its body, function-local imports included
    (``from pkg import sub`` names ``pkg.sub``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runs(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def floor(name: str) -> tuple[int, str]:
    """(height, house) of a module."""
    parts = name.split(".")
    if len(parts) == 1:
        return 4, "face"
    top = parts[1]
    return {"compiler": (0, "compiler"), "passes": (1, "passes"), "backends": (1, "backends"), "api": (2, "api"),
            "budget": (2, "api"),
            "autotune": (3, "autotune"), "zoo": (4, "zoo"), "cli": (6, "cli"),
            "__main__": (7, "__main__")}.get(top, (5, top))


def test_the_graph_was_read():
    assert len(MODULES) > 30
    assert "fxforge.compiler.pass_manager" in GRAPH["fxforge.passes.fuse_batchnorm"]
    assert "fxforge.backends.tvm.tuning" in GRAPH["fxforge.backends.tvm.lower"]  # a function-local import


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_downward(name):
    height, house = floor(name)
    upward = [m for m in sorted(GRAPH[name]) if floor(m)[0] > height or (floor(m)[0] == height and floor(m)[1] != house)]
    assert not upward, f"{name} imports {upward}, above it or beside it"


def test_compiler_imports_only_compiler():
    for name, deps in GRAPH.items():
        if name.startswith("fxforge.compiler"):
            assert all(d.startswith("fxforge.compiler") for d in deps), (name, deps)


def test_no_circle():
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' → '.join(e.args[1])}")


def is_pass_module(name: str) -> bool:
    """A pass file: directly in fxforge/passes/ (the package's own __init__ and the lib/ and analysis/ floors
    excluded)."""
    parts = name.split(".")
    return len(parts) == 3 and parts[1] == "passes"


def test_passes_never_import_each_other():
    """What several passes share lives in passes/lib/ or passes/analysis/, never in one of them (DESIGN.md)."""
    assert is_pass_module("fxforge.passes.dead_channels") and not is_pass_module("fxforge.passes.lib.qdq")
    shared = {name: sorted(d for d in deps if is_pass_module(d))
              for name, deps in GRAPH.items() if name.startswith("fxforge.passes.") and any(map(is_pass_module, deps))}
    assert not shared, f"pass modules imported by passes or their helpers: {shared}"
