"""The package's layering, checked on its source: no import cycle between its modules, no private
name (``_x``) used outside the module that defines it, and one op table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import onnx_perforate

PACKAGE = Path(onnx_perforate.__file__).parent
ROOT = "onnx_perforate"
# Scripts that import the package as users do (present in a source checkout, not in a wheel).
SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path):
    """(imported module, [names taken from it], line) for every import anywhere in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, [], node.lineno
                else:
                    yield target, [alias.name], node.lineno


def _graph() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        if module == ROOT:
            continue  # the package's front door re-exports the modules: it is nobody's dependency
        edges[module] = {target for target, _, _ in _imports(module, path) if target in MODULES and target != ROOT}
    return edges


def test_the_module_list_is_what_the_checks_read():
    assert {"onnx_perforate.rewrite", "onnx_perforate.passes.compact", "onnx_perforate.passes.op_table"} <= set(MODULES)
    assert "onnx_perforate.graph" in _graph()["onnx_perforate.rewrite"]


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_the_package_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _private_uses(files: dict[str, Path]) -> list[str]:
    found = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        imported_modules = {}  # local name -> package module
        for target, names, line in _imports(module, path):
            if target.startswith(ROOT) and target != module:
                found += [f"{path.name}:{line} imports {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in MODULES:
                        imported_modules[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES:
                        imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__") and imported_modules[node.value.id] != module):
                found.append(f"{path.name}:{node.lineno} uses {imported_modules[node.value.id]}.{node.attr}")
    return found


def test_private_use_finder_finds_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from onnx_perforate.graph import _secret\nfrom onnx_perforate import graph\ngraph._other()\n")
    assert _private_uses({"scripts.bad": bad}) == ["bad.py:1 imports onnx_perforate.graph._secret",
                                                   "bad.py:3 uses onnx_perforate.graph._other"]


def test_no_private_name_crosses_a_module_boundary():
    assert _private_uses(MODULES) == []


@pytest.mark.skipif(not SCRIPTS.is_dir(), reason="benchmarks/ is not beside the tests (not a source checkout)")
def test_benchmarks_use_only_public_names():
    assert _private_uses({f"benchmarks.{p.stem}": p for p in SCRIPTS.glob("*.py")}) == []


def test_op_lists_live_only_in_the_op_table():
    """A position-wise op's name appears as a string only in the op table (and in ops.py / cuda_kernels.py,
    which define PerforatedConv's activation attribute)."""
    allowed = {"onnx_perforate.passes.op_table", "onnx_perforate.ops", "onnx_perforate.cuda_kernels"}
    listed = []
    for module, path in MODULES.items():
        if module in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if names & {"Sigmoid", "Tanh", "Elu", "PRelu", "Relu"}:
                    listed.append(f"{path.name}:{node.lineno}")
    assert listed == []
