"""The package imports light: a machine without onnx-graphsurgeon and onnx-ad (a bare GPU box) can still
load the library helpers, the reference ops and the CUDA kernels binding, and the public names resolve
on first use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import onnx_perforate

HEAVY = ["onnx_graphsurgeon", "onnx_ad"]
# Registering the ops' ONNX schemas on import loads opset.py and the light modules it reads, no others.
SCHEMA_MODULES = {"onnx_perforate.opset", "onnx_perforate.ops", "onnx_perforate._library", "onnx_perforate.errors",
                  "onnx_perforate.validation"}

# Runs in a fresh interpreter where importing either heavy package raises ImportError, as it would on a
# machine that does not have them.
BLOCKED_IMPORTS = textwrap.dedent(
    """
    import json, sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {heavy!r}:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    import onnx_perforate
    after_package = sorted(m for m in sys.modules if m.startswith("onnx_perforate"))
    from onnx_perforate import _library, cuda_kernels, ops, masks, errors
    from onnx_perforate import DOMAIN, PerforateError, has_library, library_path
    try:
        onnx_perforate.rewrite
        rewrite_error = None
    except ImportError as error:
        rewrite_error = str(error)
    print(json.dumps({{"after_package": after_package, "domain": DOMAIN, "rewrite_error": rewrite_error,
                       "heavy_loaded": sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})}}))
    """
).format(heavy=set(HEAVY))


def _run(code: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_light_modules_import_without_graphsurgeon_or_onnx_ad():
    result = _run(BLOCKED_IMPORTS)
    assert result["domain"] == onnx_perforate.DOMAIN
    assert result["heavy_loaded"] == []
    # `import onnx_perforate` loads only what registers the ops' ONNX schemas; everything else is
    # resolved on first use.
    assert "onnx_perforate.opset" in result["after_package"]
    assert set(result["after_package"]) <= {"onnx_perforate"} | SCHEMA_MODULES
    # The heavy exports fail only when used, naming what is missing.
    assert "onnx_graphsurgeon" in result["rewrite_error"]


def test_plain_import_loads_no_heavy_module():
    result = _run(
        "import json, sys; import onnx_perforate; "
        "print(json.dumps({'loaded': sorted(m for m in sys.modules if m.split('.')[0] in %r "
        "or m.startswith('onnx_perforate.'))}))" % (HEAVY,)
    )
    assert set(result["loaded"]) <= SCHEMA_MODULES


def test_every_public_name_resolves_after_its_submodule_was_imported():
    for heavy in HEAVY:  # absent on a machine that only runs the kernels
        pytest.importorskip(heavy, reason=f"resolving rewrite/tune needs {heavy}")
    # Loading the submodule first (as `from onnx_perforate.rewrite import ...` does) must not leave the
    # module object where the public function `onnx_perforate.rewrite` belongs.
    result = _run(textwrap.dedent(
        """
        import importlib, json, types
        import onnx_perforate
        rewrite_module = importlib.import_module("onnx_perforate.rewrite")
        tuning_module = importlib.import_module("onnx_perforate.tuning")
        resolved = {name: getattr(onnx_perforate, name) for name in onnx_perforate.__all__}
        print(json.dumps({
            "missing": [name for name, value in resolved.items() if value is None],
            "rewrite_is_function": onnx_perforate.rewrite is rewrite_module.rewrite,
            "rewrite_save_is_save": onnx_perforate.rewrite_save is rewrite_module.save,
            "tune_is_function": onnx_perforate.tune is tuning_module.tune,
            "masks_is_module": isinstance(onnx_perforate.masks, types.ModuleType),
            "in_dir": "rewrite" in dir(onnx_perforate),
        }))
        """
    ))
    assert result == {"missing": [], "rewrite_is_function": True, "rewrite_save_is_save": True,
                      "tune_is_function": True, "masks_is_module": True, "in_dir": True}


def test_unknown_name_is_an_attribute_error():
    try:
        onnx_perforate.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown name resolved")
