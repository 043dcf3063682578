"""Shared fixtures: where the real data lives, and whether the compiled library is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import onnx_perforate

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_MODELS = REPO / "sample_models"


def shared_file(*parts: str) -> Path:
    """A file under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the real data in ../shared is not present)")
    return path


@pytest.fixture
def require_library():
    if onnx_perforate.has_library():
        return
    message = "the compiled custom-op library is not built (pip install . builds it)"
    if os.environ.get("ONNX_PERFORATE_REQUIRE_LIBRARY") == "1":
        pytest.fail(message)
    pytest.skip(message)
