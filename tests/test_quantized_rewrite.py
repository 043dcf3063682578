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
    settings = dict(quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                    activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                    **helpers.ORT_EXACT_QUANTIZATION)
    quantization.quantize_static(str(source), str(path), Reader(calibration), **{**settings, **options})
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
    # conv2 and conv3 read conv1's compact output: no NNInterpolate is left for it; their outputs (one
    # mask) are added compact through the QDQ Add: one NNInterpolate remains, for the graph output
    assert {layer.key: layer.implicit_input for layer in report.layers}["conv2"] == "conv1"
    assert kinds.count("NNInterpolate") == 1
    assert any(node.startswith("add") for node in {layer.key: layer for layer in report.layers}["conv2"].compact)


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
    scale = next(t.name for t in qdq_model.graph.initializer if t.name.startswith("conv2_w") and t.name.endswith("scale"))
    wrong = with_initializer(qdq_model, scale, np.full(5, 0.01, np.float32))
    with pytest.raises(UnsupportedNodeError, match="'conv2'"):
        rewrite(wrong, ones(wrong))
    # the model is untouched by a refused rewrite: the same request without conv2 works
    partial = {k: v for k, v in ones(wrong).items() if k != "conv2"}
    assert [n.op_type for n in rewrite(wrong, partial).graph.node].count("PerforatedQLinearConv") == 2


def test_asymmetric_int8_weights(qdq_model):
    """conv2's int8 weights with zero point 3 (w - 3 does not fit int8): the op corrects for the zero
    point, and all-ones masks reproduce ORT's INT8 model."""
    zero_point = next(t.name for t in qdq_model.graph.initializer if t.name.startswith("conv2_w") and "zero_point" in t.name)
    asymmetric = with_initializer(qdq_model, zero_point, np.full(8, 3, np.int8))
    x = np.random.default_rng(10).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    ones = rewrite(asymmetric, conv_masks(asymmetric, lambda hw: np.ones(hw, bool)))
    assert [n.op_type for n in ones.graph.node].count("PerforatedQLinearConv") == 3
    np.testing.assert_array_equal(run(ones, x), run(asymmetric, x))
    assert not np.array_equal(run(asymmetric, x), run(qdq_model, x)), "the zero point should matter"


def producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


def conv_node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def as_constant_nodes(model, names):
    """``model`` with the initializers ``names`` turned into Constant nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    constants = [helper.make_node("Constant", [], [name], value=inits[name]) for name in names]
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def quantized_in_graph(model, conv, *, constant_node, q_scale_factor=1.0, seed=0):
    """``conv``'s int8 weight replaced by ``QuantizeLinear(float weight)`` (a Constant node or an
    initializer) feeding its DequantizeLinear, as QAT exports write weights: the float weight is the
    dequantized one plus noise, with some values far out of range so that quantization saturates. The
    QuantizeLinear's scale is ``q_scale_factor`` times the DequantizeLinear's."""
    rng = np.random.default_rng(seed)
    dq = producer(model, conv_node(model, conv).input[1])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, scale = inits[dq.input[0]], inits[dq.input[1]]
    w = ((q + rng.uniform(-0.5, 0.5, q.shape)) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    w.flat[::7] *= 3
    q_scale = (scale * np.float32(q_scale_factor)).astype(np.float32)
    kept = [t for t in model.graph.initializer if t.name != dq.input[0]]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + [numpy_helper.from_array(q_scale, f"{conv}_q_scale")])
    source = helper.make_node("Constant", [], [f"{conv}_w_float"], value=numpy_helper.from_array(w, "v"))
    if not constant_node:
        model.graph.initializer.append(numpy_helper.from_array(w, f"{conv}_w_float"))
    quantize = helper.make_node("QuantizeLinear", [f"{conv}_w_float", f"{conv}_q_scale", dq.input[2]], [dq.input[0]],
                                name=f"{conv}_w_QuantizeLinear", axis=0)
    nodes = ([source] if constant_node else []) + [quantize] + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_constants_however_expressed(qdq_model):
    """conv1's parameters as Constant nodes, conv2's weight a QuantizeLinear of a float Constant node,
    conv3's a QuantizeLinear of a float initializer with another scale than its DequantizeLinear's: the
    rewrite folds them (round half to even, saturate) and reproduces ORT's INT8 model exactly."""
    model = onnx.ModelProto.FromString(qdq_model.SerializeToString())
    conv1 = conv_node(model, "conv1")
    initializers = {t.name for t in model.graph.initializer}
    names = {i for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv1.input
             for i in n.input if i in initializers}
    model = as_constant_nodes(model, sorted(names))
    model = quantized_in_graph(model, "conv2", constant_node=True)
    model = quantized_in_graph(model, "conv3", constant_node=False, q_scale_factor=0.5, seed=1)
    onnx.checker.check_model(model)
    assert {"conv1_w_quantized", "x_scale", "conv1_b_quantized"} <= {n.output[0] for n in model.graph.node
                                                                      if n.op_type == "Constant"}
    x = np.random.default_rng(5).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    ones = rewrite(model, conv_masks(model, lambda hw: np.ones(hw, bool)))
    kinds = [n.op_type for n in ones.graph.node]
    assert kinds.count("PerforatedQLinearConv") == 3 and "Conv" not in kinds
    assert not [n for n in ones.graph.node if n.op_type == "QuantizeLinear" and "_w_" in n.name]
    np.testing.assert_array_equal(run(ones, x), run(model, x))
    half = rewrite(model, conv_masks(model, lambda hw: np.asarray(masks.grid(hw, 0.5))))
    np.testing.assert_allclose(run(half, x), reference_run(half, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", ["per-tensor weights", "uint8 weights, zero point 128", "QLinearConv, uint8 weights",
                                    "S8S8", "QLinearConv, S8S8"])
def test_other_schemes_that_run_exactly(tmp_path, scheme):
    """Per-tensor int8 weights; uint8 weights (quantize_static gives them zero point 128, so w - 128
    fits int8 and the rewrite centres them); int8 activations (S8S8, quantize_static's default), in QDQ
    and QOperator form: all-ones masks reproduce ORT's INT8 model, perforated ones the reference."""
    rng = np.random.default_rng(6)
    calibration = rng.uniform(-1, 1, (8, 3, 12, 12)).astype(np.float32)
    options = {"per_channel": False} if scheme.startswith("per-tensor") else {"weight_type": quantization.QuantType.QUInt8}
    if scheme.endswith("S8S8"):
        options = {"activation_type": quantization.QuantType.QInt8}
    if scheme == "QLinearConv, S8S8":
        options.update(quant_format=quantization.QuantFormat.QOperator, op_types_to_quantize=["Conv"])
    elif scheme.startswith("QLinearConv"):  # quantize_static writes int8 weights there: shift them to uint8
        options = dict(quant_format=quantization.QuantFormat.QOperator, op_types_to_quantize=["Conv"])
    model = quantize(float_model(rng), calibration, tmp_path / "q.onnx", **options)
    if scheme == "QLinearConv, uint8 weights":
        for conv in (n for n in model.graph.node if n.op_type == "QLinearConv"):
            inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
            model = with_initializer(model, conv.input[3], (inits[conv.input[3]].astype(np.int16) + 128).astype(np.uint8))
            model = with_initializer(model, conv.input[5], (inits[conv.input[5]].astype(np.int16) + 128).astype(np.uint8))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_w_quantized")]
    assert weights and all(w.dtype == (np.uint8 if "uint8" in scheme else np.int8) for w in weights)
    activations = {numpy_helper.to_array(t).dtype for t in model.graph.initializer if t.name == "x_zero_point"}
    assert activations == {np.dtype(np.int8 if scheme.endswith("S8S8") else np.uint8)}
    x = rng.uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    ones = rewrite(model, conv_masks(model, lambda hw: np.ones(hw, bool)))
    assert [n.op_type for n in ones.graph.node].count("PerforatedQLinearConv") == 3
    np.testing.assert_array_equal(run(ones, x), run(model, x))
    half = rewrite(model, conv_masks(model, lambda hw: np.asarray(masks.grid(hw, 0.5))))
    np.testing.assert_allclose(run(half, x), reference_run(half, x), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(helpers.run_fallback(half, x)[0], run(half, x))


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_constant_node_weight_quantized_like_an_activation(tmp_path, activations):
    """quantize_static quantizes a weight that is a Constant node (helpers.synthetic_cnn's conv2) as it
    quantizes activations: a QuantizeLinear in the graph to an asymmetric 8-bit tensor, per tensor. The
    rewrite folds it (uint8: shifted to int8) and reproduces ORT's INT8 model, U8S8 and S8S8, with the
    MaxPool between them an 8-bit CompactPool; perforated, it matches the Python fallback (the reference)."""
    onnx.save(helpers.synthetic_cnn(), tmp_path / "cnn.onnx")
    quantization.quantize_static(str(tmp_path / "cnn.onnx"), str(tmp_path / "cnn_q.onnx"),
                                 Reader(helpers.synthetic_input(8)), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, weight_type=quantization.QuantType.QInt8,
                                 activation_type=quantization.QuantType.QUInt8 if activations == "uint8"
                                 else quantization.QuantType.QInt8, **helpers.ORT_EXACT_QUANTIZATION)
    cnn = onnx.load(str(tmp_path / "cnn_q.onnx"))
    quantizer = producer(cnn, producer(cnn, conv_node(cnn, "conv2").input[1]).input[0])
    assert quantizer.op_type == "QuantizeLinear" and producer(cnn, quantizer.input[0]).op_type == "Constant"
    zero = numpy_helper.to_array(next(t for t in cnn.graph.initializer if t.name == quantizer.input[2]))
    assert zero.dtype == np.dtype(activations) and zero not in (0, 128)
    x = helpers.synthetic_input(4, seed=3)
    ones = rewrite(cnn, conv_masks(cnn, lambda hw: np.ones(hw, bool)))
    kinds = [n.op_type for n in ones.graph.node]
    assert kinds.count("PerforatedQLinearConv") == 2 and "CompactPool" in kinds and "MaxPool" not in kinds
    np.testing.assert_array_equal(run(ones, x), run(cnn, x))
    half = rewrite(cnn, conv_masks(cnn, lambda hw: np.asarray(masks.grid(hw, 0.5))))
    # the Python fallback runs the ops as the numpy reference
    np.testing.assert_array_equal(run(half, x), helpers.run_fallback(half, x)[0])


def test_mismatched_activation_scales_between_a_quantize_and_its_dequantize(qdq_model):
    """conv1's output quantized with one scale and dequantized with another before conv2 and conv3: the
    uint8 tensor is what it is and the readers use their DequantizeLinear's scale, as ORT does; their
    int32 biases must then be in units of that scale times the weight's, else the rewrite refuses."""
    model = onnx.ModelProto.FromString(qdq_model.SerializeToString())
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "conv1_relu_QuantizeLinear_Output")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    other = (inits[dq.input[1]] * np.float32(1.3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(other, "other_scale"))
    dq.input[1] = "other_scale"
    ones = lambda model: conv_masks(model, lambda hw: np.ones(hw, bool))  # noqa: E731
    with pytest.raises(UnsupportedNodeError, match="'conv2': bias scale 'conv2_b_quantized_scale' is not x_scale \\* w_scale"):
        rewrite(model, ones(model))
    for conv in ("conv2", "conv3"):
        model = with_initializer(model, f"{conv}_b_quantized_scale", (other * inits[f"{conv}_w_scale"]).astype(np.float32))
    x = np.random.default_rng(8).uniform(-1, 1, (1, 3, 12, 12)).astype(np.float32)
    perforated = rewrite(model, ones(model))
    np.testing.assert_array_equal(run(perforated, x), run(model, x))
    assert not np.array_equal(run(model, x), run(qdq_model, x)), "the scale change should matter"


def test_schemes_that_are_refused_name_the_node_and_what_is_supported(tmp_path, qdq_model):
    rng = np.random.default_rng(9)
    calibration = rng.uniform(-1, 1, (8, 3, 12, 12)).astype(np.float32)
    ones = lambda model: conv_masks(model, lambda hw: np.ones(hw, bool))  # noqa: E731
    # a uint8 input with an int8 output
    mixed = onnx.ModelProto.FromString(qdq_model.SerializeToString())
    q = next(n for n in mixed.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "conv2_out")
    mixed.graph.initializer.append(numpy_helper.from_array(np.int8(0), "int8_zero"))
    q.input[2] = "int8_zero"
    with pytest.raises(UnsupportedNodeError, match="'conv2': y_zero_point 'int8_zero' is int8 but the input is uint8"):
        rewrite(mixed, ones(mixed))
    # per-channel weight scale and zero point along the input channels (axis 1)
    wrong_axis = onnx.ModelProto.FromString(qdq_model.SerializeToString())
    dq = producer(wrong_axis, conv_node(wrong_axis, "conv2").input[1])
    next(a for a in dq.attribute if a.name == "axis").i = 1
    wrong_axis = with_initializer(with_initializer(wrong_axis, dq.input[1], np.full(16, 0.01, np.float32)),
                                  dq.input[2], np.zeros(16, np.int8))
    with pytest.raises(UnsupportedNodeError, match="'conv2'.*per axis 1, expected per output channel"):
        rewrite(wrong_axis, ones(wrong_axis))
    # per-channel activation parameters
    per_channel_x = onnx.ModelProto.FromString(qdq_model.SerializeToString())
    dq = producer(per_channel_x, conv_node(per_channel_x, "conv2").input[0])
    dq.attribute.append(helper.make_attribute("axis", 1))
    inits = {t.name: numpy_helper.to_array(t) for t in per_channel_x.graph.initializer}
    per_channel_x.graph.initializer.extend([
        numpy_helper.from_array(np.full(16, inits[dq.input[1]], np.float32), "x_scales"),
        numpy_helper.from_array(np.full(16, inits[dq.input[2]], np.uint8), "x_zero_points")])
    dq.input[1], dq.input[2] = "x_scales", "x_zero_points"
    with pytest.raises(UnsupportedNodeError, match="'conv2': x_scale 'x_scales' has shape \\[16\\], expected a scalar"):
        rewrite(per_channel_x, ones(per_channel_x))


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
@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_qdq_squeezenet_all_ones_reproduces_the_int8_model(tmp_path, activations):
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
                                 activation_type=quantization.QuantType.QUInt8 if activations == "uint8"
                                 else quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8, **helpers.ORT_EXACT_QUANTIZATION)
    int8 = onnx.load(str(tmp_path / "q.onnx"))
    perforated, report = rewrite_with_report(int8, conv_masks(int8, lambda hw: np.ones(hw, bool)))
    assert [n.op_type for n in perforated.graph.node].count("PerforatedQLinearConv") == 26
    last = producer(int8, int8.graph.output[0].name)  # the DequantizeLinear of the probabilities
    step = float(numpy_helper.to_array(next(t for t in int8.graph.initializer if t.name == last.input[1])))
    for i in (1, 3, 5):  # held out from the calibration images
        got, expected = run(perforated, x[i:i + 1]), run(int8, x[i:i + 1])
        if activations == "uint8":
            np.testing.assert_array_equal(got, expected)
        else:
            # ORT runs most S8S8 Convs as float Conv between DequantizeLinear and QuantizeLinear (it fuses
            # only U8S8 ones here): its float sums round differently in rare ties (docs/ops.md).
            off = np.abs(got - expected) > step / 2
            assert np.abs(got - expected).max() <= 4 * step and off.mean() < 0.01, (off.sum(), np.abs(got - expected).max())
            assert got.argmax() == expected.argmax()
    grid, report = rewrite_with_report(int8, conv_masks(int8, lambda hw: np.asarray(masks.grid(hw, 0.5))))
    assert report.mac_reduction > 1.8
    assert run(grid, x[1:2]).shape == (1, 1000, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Compact propagation through the QDQ graph


def fire_model(rng, pool=True, pool_attrs=None):
    """conv1 (3x3) -> MaxPool (3x3, stride 2, or ``pool_attrs``) -> a Fire module (squeeze 1x1 -> expand
    1x1 and expand 3x3 -> Concat) -> Dropout -> conv10 (1x1) -> GlobalAveragePool, Relus after every
    Conv, x [N, 3, 16, 16]. pool=False: conv1 has stride 2 instead of the MaxPool."""
    nodes, inits = [], []

    def conv(name, x, m, c, k, stride=1):
        w = (rng.standard_normal((m, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(m)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_out"], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2))
        nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    c1 = conv("conv1", "x", 16, 3, 3, stride=1 if pool else 2)
    if pool:
        nodes.append(helper.make_node("MaxPool", [c1], ["pool1"], name="pool1",
                                      **(pool_attrs or dict(kernel_shape=[3, 3], strides=[2, 2]))))
    squeeze = conv("squeeze", "pool1" if pool else c1, 8, 16, 1)
    e1, e3 = conv("expand1x1", squeeze, 12, 8, 1), conv("expand3x3", squeeze, 12, 8, 3)
    nodes.append(helper.make_node("Concat", [e1, e3], ["concat"], name="concat", axis=1))
    nodes.append(helper.make_node("Dropout", ["concat"], ["dropped"], name="dropout"))
    c10 = conv("conv10", "dropped", 10, 24, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [c10], ["y"], name="gap"))
    graph = helper.make_graph(nodes, "fire", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module", params=[True, False], ids=["maxpool", "strided"])
def qdq_fire(request, tmp_path_factory):
    rng = np.random.default_rng(5)
    calibration = rng.uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32)
    return quantize(fire_model(rng, request.param), calibration, tmp_path_factory.mktemp("fire") / "fire.onnx")


def shared_masks(model, rate, seed=0):
    """One random mask per output size, shared by every Conv of that size (as grid masks are)."""
    by_size = {}
    return conv_masks(model, lambda hw: by_size.setdefault(hw, np.asarray(masks.uniform(hw, rate, seed=seed + hw[0]))))


def test_qdq_fire_module_stays_compact_and_matches_the_explicit_form(qdq_fire):
    """The Fire module's Concat (DequantizeLinear -> Concat -> QuantizeLinear) and Dropout run on the
    compact 8-bit tensors, the 1x1 convs with their input's mask are plain GEMMs on them, and the result
    is the explicit form's (NNInterpolate after every conv, then the standard QDQ ops) to the bit."""
    x = np.random.default_rng(6).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)  # batch > 1
    chosen = shared_masks(qdq_fire, 0.5)
    compact, report = rewrite_with_report(qdq_fire, chosen)
    explicit = rewrite(qdq_fire, chosen, compact=False)
    kinds = [n.op_type for n in compact.graph.node]
    pooled = "CompactPool" in kinds
    # conv10's output is interpolated for the GlobalAveragePool (QLinearGlobalAveragePool on the full
    # tensor); nothing else is (the MaxPool, an 8-bit CompactPool, reads conv1's compact tensor).
    assert kinds.count("NNInterpolate") == 1
    assert [n.op_type for n in explicit.graph.node].count("NNInterpolate") == 5 - pooled  # conv1's: pooled compact
    layers = {layer.key: layer for layer in report.layers}
    assert "concat" in layers["expand1x1"].compact and any("dropout" in n for n in layers["expand1x1"].compact)
    assert any(n.startswith("conv10 (1x1 GEMM") for n in layers["expand1x1"].compact)
    assert any(n.startswith("expand3x3 (reads it through X_index") for n in layers["squeeze"].compact)
    assert layers["conv10"].implicit_input == "expand1x1"
    concat_input = next(n for n in compact.graph.node if n.op_type == "Concat").input
    assert all(name.endswith(".compact") for name in concat_input)
    # No layout changes and no views: the 1x1 GEMMs read [N, C, K] itself, the pool its compact input.
    assert not {"Reshape", "Transpose", "Gather", "NhwcMaxPool"} & set(kinds)
    if pooled:  # the pool reads conv1's compact tensor and gives the squeeze [N, C, K] at its positions
        pool = next(n for n in compact.graph.node if n.op_type == "CompactPool")
        assert producer(compact, pool.input[0]).name == "conv1" and len(pool.input) == 3
        squeeze = next(n for n in compact.graph.node if n.name == "squeeze")
        assert producer(compact, squeeze.input[0]) is pool
        assert any("CompactPool on the compact 8-bit tensor, at the positions" in note for note in report.notes)
    got = run(compact, x)
    np.testing.assert_array_equal(got, run(explicit, x))
    np.testing.assert_allclose(got, reference_run(compact, x), rtol=0, atol=1e-5)
    assert not np.allclose(got, run(qdq_fire, x)), "perforation should change the output"


@pytest.mark.parametrize("pool_attrs", [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
                                        dict(kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1])],
                         ids=["pads-ceil", "dilations"])
def test_qdq_max_pool_with_pads_ceil_mode_and_dilations_pools_the_compact_tensor(pool_attrs, tmp_path):
    """The 8-bit CompactPool that replaces DequantizeLinear -> MaxPool -> QuantizeLinear keeps the
    MaxPool's pads, ceil_mode and dilations: the compact form matches the explicit one to the bit."""
    rng = np.random.default_rng(11)
    model = quantize(fire_model(rng, pool_attrs=pool_attrs), rng.uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32),
                     tmp_path / "fire.onnx")
    chosen = shared_masks(model, 0.5, seed=1)
    compact = rewrite(model, chosen)
    pool = next(n for n in compact.graph.node if n.op_type == "CompactPool")
    attributes = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    assert all(list(attributes[k]) == v if isinstance(v, list) else attributes[k] == v for k, v in pool_attrs.items())
    x = np.random.default_rng(12).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    got = run(compact, x)
    np.testing.assert_array_equal(got, run(rewrite(model, chosen, compact=False), x))
    np.testing.assert_array_equal(got, helpers.run_fallback(compact, x)[0])  # the numpy reference's pooling
    # all-ones masks: the CompactPool against ORT's own 8-bit MaxPool in the INT8 model
    ones = rewrite(model, conv_masks(model, lambda hw: np.ones(hw, bool)))
    assert "CompactPool" in [n.op_type for n in ones.graph.node]
    np.testing.assert_array_equal(run(ones, x), run(model, x))


def test_qdq_fire_module_all_ones_reproduces_the_int8_model(qdq_fire):
    x = np.random.default_rng(7).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    perforated = rewrite(qdq_fire, conv_masks(qdq_fire, lambda hw: np.ones(hw, bool)))
    np.testing.assert_array_equal(run(perforated, x), run(qdq_fire, x))


def test_qdq_compact_stops_where_ort_runs_8_bit_ops_on_the_full_tensor(qdq_fire):
    """A dequantized compact tensor read by an unperforated Conv stays full (ORT fuses that Conv into
    QLinearConv; the float compact form would run it in float), and the report says why."""
    chosen = shared_masks(qdq_fire, 0.5)
    del chosen["expand3x3"]
    perforated, report = rewrite_with_report(qdq_fire, chosen)
    why = {layer.key: layer for layer in report.layers}["squeeze"].interpolated_for
    assert any("Conv 'expand3x3'" in reason and "8-bit full tensor" in reason for reason in why.values()), why
    assert "Conv" in [n.op_type for n in perforated.graph.node]  # left for ORT's QLinearConv
    x = np.random.default_rng(8).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(perforated, x), run(rewrite(qdq_fire, chosen, compact=False), x))


def test_python_fallback_runs_the_compact_qdq_fire_module(qdq_fire):
    x = np.random.default_rng(9).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    perforated = rewrite(qdq_fire, shared_masks(qdq_fire, 0.5, seed=3))
    np.testing.assert_array_equal(helpers.run_fallback(perforated, x)[0], run(perforated, x))
