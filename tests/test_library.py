"""Finding the compiled library and the session options that load it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnx_perforate
from onnx_perforate import LibraryNotFoundError, ops

from helpers import assert_close_to_reference, needs_library, perforated_model


def test_library_path_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNX_PERFORATE_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(LibraryNotFoundError, match="missing.so"):
        onnx_perforate.library_path()
    assert not onnx_perforate.has_library()


@needs_library
def test_session_options_register_the_library_and_set_threads():
    options = onnx_perforate.session_options(1, allow_spinning=False, enable_mem_pattern=False)
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.enable_mem_pattern is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@needs_library
def test_cuda_options_need_the_cuda_library(monkeypatch):
    if onnx_perforate.cuda_library_path() is None:
        with pytest.raises(LibraryNotFoundError, match="cuda"):
            onnx_perforate.session_options(cuda=True)
        return
    # The CUDA library holds the CPU kernels too: a perforated model runs with its options on the CPU.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    mask = rng.random((6, 6)) < 0.5
    mask[0, 0] = True
    attrs = ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1))
    model = perforated_model(x.shape, w, None, mask, attrs, interpolate=False)
    session = ort.InferenceSession(model.SerializeToString(), onnx_perforate.session_options(1, cuda=True),
                                   providers=["CPUExecutionProvider"])
    assert_close_to_reference(session.run(None, {"x": x})[0], x, w, None, mask, attrs)
