"""Rewriting quantized models (QDQ from onnxruntime.quantization, and QLinearConv) into
PerforatedQLinearConv: all-ones masks reproduce ORT's INT8 model bit for bit, perforated models match the
reference evaluator, perforated layers read each other's compact outputs, bad schemes are refused naming
the node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

import helpers
from onnx_perforate import masks, ops
from onnx_perforate.errors import UnsupportedNodeError
from onnx_perforate.graph import conv_geometry, infer_shapes
from onnx_perforate.rewrite import rewrite, rewrite_with_report

pytestmark = helpers.needs_library
quantization = pytest.importorskip("onnxruntime.quantization")


def float_model(rng):
    """conv1 (3x3, Relu) -> conv2 (3x3, stride 1) and conv3 (1x1) both reading conv1 -> Add."""
    def conv(name, x, m, c, k, pad, relu):
        w = (rng.standard_normal((m, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(m)).astype(np.float32)
        nodes = [helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_out"], name=name,
                                  kernel_shape=[k, k], pads=[pad] * 4)]
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
        return nodes, [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]

    n1, i1 = conv("conv1", "x", 16, 3, 3, 1, True)
    n2, i2 = conv("conv2", "conv1_relu", 8, 16, 3, 1, False)
    n3, i3 = conv("conv3", "conv1_relu", 8, 16, 1, 0, False)
    nodes = n1 + n2 + n3 + [helper.make_node("Add", ["conv2_out", "conv3_out"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], i1 + i2 + i3)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class Reader(quantization.CalibrationDataReader):
    def __init__(self, inputs):
        self.items = iter([{"x": x[None]} for x in inputs])

    def get_next(self):
        return next(self.items, None)


def quantize(model, calibration, path, **options):
    source = path.with_suffix(".float.onnx")
    onnx.save(model, source)
    quantization.quantize_static(str(source), str(path), Reader(calibration), quant_format=options.pop(
        "quant_format", quantization.QuantFormat.QDQ), per_channel=True, activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8, **options)
    return onnx.load(str(path))


def run(model, x):
    return helpers.run_ort(model, x)[0]


def reference_run(model, x):
    """onnx.reference with the default opset raised to 19: it implements DequantizeLinear only from 19
    on (same semantics for these types)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, 19)
    return ops.reference_evaluator(model).run(None, {"x": x})[0]


def conv_masks(model, make):
    shapes = infer_shapes(model)
    return {conv_geometry(n, shapes).key: make(conv_geometry(n, shapes).out_hw)
            for n in model.graph.node if n.op_type in ("Conv", "QLinearConv")}


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    rng = np.random.default_rng(0)
    calibration = rng.uniform(-1, 1, (8, 3, 12, 12)).astype(np.float32)
    return quantize(float_model(rng), calibration, tmp_path_factory.mktemp("q") / "qdq.onnx")


def test_qdq_all_ones_reproduces_the_int8_model(qdq_model):
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    perforated, report = rewrite_with_report(qdq_model, conv_masks(qdq_model, lambda hw: np.ones(hw, bool)))
    kinds = [n.op_type for n in perforated.graph.node]
    assert kinds.count("PerforatedQLinearConv") == 3 and "Conv" not in kinds
    np.testing.assert_array_equal(run(perforated, x), run(qdq_model, x))
    # conv2 and conv3 read conv1's compact output: no NNInterpolate is left for it
    assert {layer.key: layer.implicit_input for layer in report.layers}["conv2"] == "conv1"
    assert kinds.count("NNInterpolate") == 2


def test_qdq_perforated_matches_the_reference_evaluator(qdq_model):
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    chosen = conv_masks(qdq_model, lambda hw: np.asarray(masks.uniform(hw, 0.5, seed=hw[0])))
    perforated, report = rewrite_with_report(qdq_model, chosen)
    assert report.mac_reduction > 1.5
    got = run(perforated, x)
    expected = reference_run(perforated, x)
    # The int8 path is exact in both; the final float DequantizeLinear/Add may round differently.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert not np.allclose(got, run(qdq_model, x)), "perforation should change the output"


def test_python_fallback_runs_quantized_models(qdq_model):
    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    perforated = rewrite(qdq_model, conv_masks(qdq_model, lambda hw: np.asarray(masks.uniform(hw, 0.5, seed=7))))
    np.testing.assert_array_equal(helpers.run_fallback(perforated, x)[0], run(perforated, x))


def test_qlinear_conv_qoperator_format(tmp_path):
    rng = np.random.default_rng(3)
    calibration = rng.uniform(-1, 1, (8, 3, 12, 12)).astype(np.float32)
    model = quantize(float_model(rng), calibration, tmp_path / "qop.onnx",
                     quant_format=quantization.QuantFormat.QOperator, op_types_to_quantize=["Conv"])
    assert [n.op_type for n in model.graph.node].count("QLinearConv") == 3
    x = rng.uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    ones = rewrite(model, conv_masks(model, lambda hw: np.ones(hw, bool)))
    np.testing.assert_array_equal(run(ones, x), run(model, x))
    half = rewrite(model, conv_masks(model, lambda hw: np.asarray(masks.grid(hw, 0.5))))
    np.testing.assert_allclose(run(half, x), reference_run(half, x), rtol=0, atol=1e-5)


def with_initializer(model, name, value):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
    return model


def test_unsupported_schemes_name_the_node(qdq_model):
    ones = lambda model: conv_masks(model, lambda hw: np.ones(hw, bool))  # noqa: E731
    zero_point = next(t.name for t in qdq_model.graph.initializer if t.name.startswith("conv2_w") and "zero_point" in t.name)
    asymmetric = with_initializer(qdq_model, zero_point, np.full(8, 3, np.int8))
    with pytest.raises(UnsupportedNodeError, match="'conv2'.*asymmetric"):
        rewrite(asymmetric, ones(asymmetric))
    scale = next(t.name for t in qdq_model.graph.initializer if t.name.startswith("conv2_w") and t.name.endswith("scale"))
    wrong = with_initializer(qdq_model, scale, np.full(5, 0.01, np.float32))
    with pytest.raises(UnsupportedNodeError, match="'conv2'"):
        rewrite(wrong, ones(wrong))
    # the model is untouched by a refused rewrite: the same request without conv2 works
    partial = {k: v for k, v in ones(asymmetric).items() if k != "conv2"}
    assert [n.op_type for n in rewrite(asymmetric, partial).graph.node].count("PerforatedQLinearConv") == 2


def test_dequantized_conv_without_quantized_output_is_refused():
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q")
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "ws"], ["w_f"]),
        helper.make_node("Conv", ["x_f", "w_f"], ["y"], name="lonely", kernel_shape=[3, 3]),
    ]
    inits = [w, numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.uint8(3), "xz"),
             numpy_helper.from_array(np.float32(0.1), "ws")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedNodeError, match="'lonely'.*QuantizeLinear"):
        rewrite(model, {"lonely": np.ones((6, 6), bool)})


@pytest.mark.shared
def test_qdq_squeezenet_all_ones_reproduces_the_int8_model(tmp_path):
    path = helpers.shared_file("data", "imagenet", "squeezenet1.1.onnx")
    from onnx_perforate import data

    images = data.load_folder(helpers.shared_file("data", "imagenet", "samples1000"), data.PRESETS["caffe"], limit=6)
    x = images.load(0, images.size)
    # opset 13 first: quantize_static's own upgrade of this opset-7 model gives DequantizeLinear an axis
    # attribute that opset 11 does not have.
    model13 = version_converter.convert_version(onnx.load(str(path)), 13)
    source = tmp_path / "squeezenet13.onnx"
    onnx.save(model13, source)
    quantization.quantize_static(str(source), str(tmp_path / "q.onnx"),
                                 type("R", (quantization.CalibrationDataReader,), {
                                     "it": iter([{"data_0": x[i:i + 1]} for i in range(0, 6, 2)]),
                                     "get_next": lambda self: next(self.it, None)})(),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    int8 = onnx.load(str(tmp_path / "q.onnx"))
    perforated, report = rewrite_with_report(int8, conv_masks(int8, lambda hw: np.ones(hw, bool)))
    assert [n.op_type for n in perforated.graph.node].count("PerforatedQLinearConv") == 26
    for i in (1, 3, 5):  # held out from the calibration images
        np.testing.assert_array_equal(run(perforated, x[i:i + 1]), run(int8, x[i:i + 1]))
    grid, report = rewrite_with_report(int8, conv_masks(int8, lambda hw: np.asarray(masks.grid(hw, 0.5))))
    assert report.mac_reduction > 1.8
    assert run(grid, x[1:2]).shape == (1, 1000, 1, 1)
