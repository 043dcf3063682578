"""Finding the compiled library and the session options that load it."""

from __future__ import annotations

import onnxruntime as ort
import pytest

import onnx_perforate
from onnx_perforate import LibraryNotFoundError


def test_library_path_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNX_PERFORATE_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(LibraryNotFoundError, match="missing.so"):
        onnx_perforate.library_path()
    assert not onnx_perforate.has_library()


@pytest.mark.usefixtures("require_library")
def test_session_options_register_the_library_and_set_threads():
    options = onnx_perforate.session_options(1, allow_spinning=False, enable_mem_pattern=False)
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.enable_mem_pattern is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.usefixtures("require_library")
def test_cuda_options_need_the_cuda_library(monkeypatch):
    if onnx_perforate.cuda_library_path() is None:
        with pytest.raises(LibraryNotFoundError, match="cuda"):
            onnx_perforate.session_options(cuda=True)
    else:
        assert onnx_perforate.session_options(cuda=True) is not None
