"""The portable form (portable.py): each custom op with a standard-ONNX function body. Its outputs are
compared with the custom-op form run by our kernels, in plain onnxruntime (no library), in ORT with the
library (which must still run our kernels) and in onnx.reference, on random inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnx_perforate
from helpers import SAMPLE_MODELS, SQUEEZENET
from onnx_perforate import masks
from onnx_perforate.cli import main
from onnx_perforate.errors import PerforateError
from onnx_perforate.portable import make_portable

SAMPLES = sorted(SAMPLE_MODELS.glob("*.onnx"))
DOMAIN = onnx_perforate.DOMAIN
# float32 rounding: the function bodies run ORT's (or numpy's) Conv, the kernels their own GEMM
RTOL, ATOL = 1e-4, 1e-4

pytestmark = pytest.mark.usefixtures("require_library")


def _session(model, *, library: bool, profile_dir=None):
    options = onnx_perforate.session_options(1) if library else ort.SessionOptions()
    options.log_severity_level = 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "profile")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _executed_ops(session) -> set:
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def _input(model, batch=2):
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value or batch for d in inputs[0].type.tensor_type.shape.dim]
    return {inputs[0].name: np.random.default_rng(3).uniform(0, 255, dims).astype(np.float32)}


def _perforated(model, **options):
    chosen = {r.name: masks.uniform(r.output_shape[2:], 0.5, seed=1) for r in onnx_perforate.inspect(model)
              if r.perforable}
    return onnx_perforate.rewrite(model, chosen, **options)


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "explicit"])
def test_portable_equals_custom_op_form(path, compact, tmp_path):
    original = onnx.load(path)
    custom = _perforated(original, compact=compact)
    portable = _perforated(original, compact=compact, portable=True)
    expanded = make_portable(custom, expand=True)
    feeds = _input(original)
    expected = _session(custom, library=True).run(None, feeds)[0]

    plain = _session(portable, library=False, profile_dir=tmp_path)
    np.testing.assert_allclose(plain.run(None, feeds)[0], expected, rtol=RTOL, atol=ATOL)
    assert not {"PerforatedConv", "NNInterpolate"} & _executed_ops(plain)  # the bodies ran

    fast = _session(portable, library=True, profile_dir=tmp_path)
    np.testing.assert_array_equal(fast.run(None, feeds)[0], expected)
    assert {"PerforatedConv", "NNInterpolate"} <= _executed_ops(fast)  # our kernels ran, not the bodies

    np.testing.assert_allclose(ReferenceEvaluator(portable).run(None, feeds)[0], expected, rtol=RTOL, atol=ATOL)

    assert not any(n.domain == DOMAIN for n in expanded.graph.node) and not expanded.functions
    assert not any(n.op_type == "Unique" for n in expanded.graph.node)  # plain numeric ops, no string test
    np.testing.assert_allclose(_session(expanded, library=False).run(None, feeds)[0], expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ReferenceEvaluator(expanded).run(None, feeds)[0], expected, rtol=RTOL, atol=ATOL)


def _conv_then(activation_nodes, initializers=()):
    """x [N, 3, 10, 10] -> Conv 3x3 (no bias) -> the activation -> y."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"), *initializers]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), *activation_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("activation", ["LeakyRelu", "Clip", "none"])
def test_every_activation_variant(activation):
    scalar = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    model = {
        "LeakyRelu": _conv_then([helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.2)]),
        "Clip": _conv_then([helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], [scalar("lo", -0.5), scalar("hi", 0.7)]),
        "none": _conv_then([helper.make_node("Identity", ["c"], ["y"])]),
    }[activation]
    mask = masks.uniform((10, 10), 0.6, seed=2)
    custom = onnx_perforate.rewrite(model, {"conv": mask})
    portable = make_portable(custom)
    (function,) = [f for f in portable.functions if f.name == "PerforatedConv"]  # one body for every node
    assert function.overload == "" and "Unique" in {n.op_type for n in function.node}
    feeds = {"x": np.random.default_rng(9).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    expected = _session(custom, library=True).run(None, feeds)[0]
    np.testing.assert_array_equal(_session(portable, library=True).run(None, feeds)[0], expected)
    for form in (portable, make_portable(custom, expand=True)):
        np.testing.assert_allclose(_session(form, library=False).run(None, feeds)[0], expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ReferenceEvaluator(form).run(None, feeds)[0], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.shared
@pytest.mark.skipif(not SQUEEZENET.is_file(), reason="../shared/data/imagenet/squeezenet1.1.onnx is absent")
def test_squeezenet_portable_in_plain_onnxruntime():
    original = onnx.load(SQUEEZENET)  # opset 7: the portable form converts it to 13 first
    custom = _perforated(original)
    portable, report = onnx_perforate.rewrite_with_report(
        original, {r.name: masks.uniform(r.output_shape[2:], 0.5, seed=1) for r in onnx_perforate.inspect(original)
                   if r.perforable}, portable=True)
    assert any("opset converted from 7 to 13" in note for note in report.notes)
    feeds = _input(original)
    expected = _session(custom, library=True).run(None, feeds)[0]
    np.testing.assert_allclose(_session(portable, library=False).run(None, feeds)[0], expected, rtol=RTOL, atol=1e-5)


def test_refusals():
    model = _conv_then([helper.make_node("Relu", ["c"], ["y"])])
    with pytest.raises(PerforateError, match="imports no 'onnx_perforate' domain"):
        make_portable(model)
    with pytest.raises(PerforateError, match="portable must be"):
        onnx_perforate.rewrite(model, {"conv": masks.grid((10, 10), 0.5)}, portable="yes")
    old = onnx_perforate.rewrite(model, {"conv": masks.grid((10, 10), 0.5)})
    old.opset_import[0].version = 11
    with pytest.raises(PerforateError, match="opset >= 13, got 11"):
        make_portable(old)


def test_cli_portable_flag(tmp_path, capsys):
    out = tmp_path / "portable.onnx"
    assert main(["perforate", str(SAMPLES[0]), "-o", str(out), "--rate", "0.5", "--portable"]) == 0
    model = onnx.load(out)
    assert {f.name for f in model.functions} == {n.op_type for n in model.graph.node if n.domain == DOMAIN} \
        >= {"PerforatedConv", "NNInterpolate", "CompactPool"}
    _session(model, library=False).run(None, _input(model))
    assert main(["perforate", str(SAMPLES[0]), "-o", str(out), "--rate", "0.5", "--portable", "expanded"]) == 0
    assert not any(n.domain == DOMAIN for n in onnx.load(out).graph.node)


@pytest.mark.parametrize("element", [TensorProto.UINT8, TensorProto.INT8, TensorProto.FLOAT])
def test_compact_pool_portable_for_every_element_type(element):
    """A CompactPool's body is its mode's pooling only: one holding AveragePool too would not load for an
    8-bit X (ONNX's AveragePool takes floats). Plain onnxruntime runs the portable form to the bit."""
    mask = masks.uniform((9, 9), 0.5, seed=4).array
    index = onnx_perforate.ops.nearest_index(mask)
    k = int(mask.sum())
    node = onnx_perforate.ops.make_compact_pool_node(["x", "x_index"], "y", "pool", mode="max", kernel_shape=[3, 3],
                                                     strides=[2, 2], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", element, [2, 3, k])],
                              [helper.make_tensor_value_info("y", element, [2, 3, 5, 5])],
                              [numpy_helper.from_array(index.astype(np.int64), "x_index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), onnx_perforate.ops.opset_import()])
    dtype = helper.tensor_dtype_to_np_dtype(element)
    rng = np.random.default_rng(5)
    x = (rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, (2, 3, k)) if element != TensorProto.FLOAT
         else rng.standard_normal((2, 3, k))).astype(dtype)
    expected = _session(model, library=True).run(None, {"x": x})[0]
    got = _session(make_portable(model), library=False).run(None, {"x": x})[0]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
