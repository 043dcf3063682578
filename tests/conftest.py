"""Fixtures shared by every test module; the code behind them lives in helpers.py."""

from __future__ import annotations

import pytest

import helpers


@pytest.fixture
def require_library():
    """Skips the test when the compiled library is missing (fails it under ONNX_PERFORATE_REQUIRE_LIBRARY=1)."""
    helpers.require_library()


@pytest.fixture(params=["library", "reference"])
def backend(request) -> str:
    """An independent way to run a perforated model, by name (see helpers.BACKENDS): ORT with the
    compiled library, and onnx.reference with the numpy ops. Run it with helpers.run_backend."""
    if request.param == "library":
        helpers.require_library()
    return request.param
