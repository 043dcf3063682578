"""The benchmark scripts' own bad-input errors: one line naming what was wrong, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SAMPLE_MODELS

SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.skipif(not SCRIPTS.is_dir(), reason="benchmarks/ is not beside the tests (not a source checkout)")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("pair, message", [
    ("nope=1", "'nope=1' is not FIELD=VALUE with FIELD one of"),
    ("pool_reorder_cost", "'pool_reorder_cost' is not FIELD=VALUE"),
    ("pool_reorder_cost=abc", "'abc' (for pool_reorder_cost) is not a Python literal"),
])
def test_compare_compact_options_refuses_unknown_fields_and_values(pair, message):
    done = run_script("compare_compact_options.py", str(SAMPLE_MODELS / "fashion_cnn.onnx"), "--before", pair)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_compare_compact_options_says_when_the_settings_change_nothing():
    # The sample CNN has no pool that the reorder term could change at this rate: nothing is timed.
    done = run_script("compare_compact_options.py", str(SAMPLE_MODELS / "fashion_cnn.onnx"), "--rate", "0.75",
                      "--before", "pool_reorder_cost=0")
    assert done.returncode == 0, done.stderr
    assert "the two rewrites are the same model: nothing to time" in done.stdout


def test_compare_builds_refuses_a_filter_matching_no_layer():
    done = run_script("compare_builds.py", "a.so", "b.so", "--only", "no such layer")
    assert done.returncode != 0
    assert "no layer's name contains 'no such layer'" in done.stderr and "Traceback" not in done.stderr
