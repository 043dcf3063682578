"""The test suite's own layout: test modules share code through helpers.py and conftest.py only."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 10
    test_names = {p.stem for p in modules} | {"conftest"}
    offenders = {p.name: sorted(_imported_modules(p) & test_names) for p in modules}
    assert not {k: v for k, v in offenders.items() if v}, "import shared code from helpers.py instead"


def test_shared_helpers_are_defined_once():
    """The library marker and the ORT runner live in helpers.py, not in test modules."""
    defined = {}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(path.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        defined.setdefault(target.id, []).append(path.name)
    for name in ("needs_library", "run_ort", "ort_run", "shared_file", "synthetic_cnn", "conv_model"):
        assert defined.get(name, ["helpers.py"]) == ["helpers.py"], f"{name} is defined in {defined[name]}"
