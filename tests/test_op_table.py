"""The op table (onnx_perforate.passes.op_table) drives interpolate-late, compact, the pooling masks
and the tuner's regions alike: an op it lists behaves the same in all four."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import masks, ops
from onnx_perforate.passes import op_table
from onnx_perforate.passes.op_table import Semantics
from onnx_perforate.rewrite import RewriteOptions, rewrite, rewrite_with_report
from onnx_perforate.tuning import compact_regions

from helpers import run_backend

RNG = np.random.default_rng(7)


def _model(nodes, inits, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    return ops.reference_evaluator(model).run(None, {"x": x})[0]


def _conv(name, x, out, channels_in=3, channels=4, inits=None):
    inits[f"{name}_w"] = RNG.normal(size=(channels, channels_in, 3, 3)) * 0.3
    return helper.make_node("Conv", [x, f"{name}_w"], [out], name=name, pads=[1, 1, 1, 1])


def test_table_kinds_are_disjoint_and_cover_the_questions():
    assert op_table.semantics("Elu") is Semantics.UNARY
    assert op_table.semantics("PRelu") is Semantics.ELEMENTWISE
    assert op_table.semantics("Relu", "com.example") is None
    assert op_table.is_position_wise("BatchNormalization") and not op_table.is_position_wise("MaxPool")
    assert set(op_table.FUSABLE_ACTIVATIONS) == {"Relu", "LeakyRelu", "Clip"}
    every = [op for kind in Semantics for op in op_table.ops_with(kind)]
    assert len(every) == len(set(every))
    channel = helper.make_node("Concat", ["a", "b"], ["c"], axis=1)
    height = helper.make_node("Concat", ["a", "b"], ["c"], axis=2)
    assert op_table.keeps_grid(channel) and not op_table.keeps_grid(height)


@pytest.mark.parametrize("op, extra", [("Elu", {}), ("Softplus", {}), ("PRelu", {"slope": (4, 1, 1)}),
                                       ("Pow", {"exponent": (1, 4, 1, 1)})])
def test_interpolate_late_moves_every_table_op(op, extra):
    inits = {}
    nodes = [_conv("conv", "x", "c", inits=inits)]
    operands = ["c"]
    for name, shape in extra.items():
        inits[name] = RNG.uniform(0.5, 1.5, size=shape)
        operands.append(name)
    nodes.append(helper.make_node(op, operands, ["a"], name="act"))
    nodes.append(helper.make_node("MaxPool", ["a"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    model = _model(nodes, inits)
    mask = masks.grid((8, 8), 0.5)
    perforated, report = rewrite_with_report(model, {"conv": mask}, compact=False)
    assert report.layers[0].interpolated_late == ["act"]
    assert "MaxPool" in report.layers[0].skipped["interpolate_late"]
    explicit = rewrite(model, {"conv": mask}, fuse=False, compact=False)
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(perforated, x), _run(explicit, x), rtol=1e-5, atol=1e-5)


def test_compact_keeps_a_rank_4_scalar_operand_exact(backend):
    """A [1, 1, 1, 1] constant broadcast against the compact [N, C, K] must not add an axis."""
    inits = {"s": np.full((1, 1, 1, 1), 0.25)}
    nodes = [_conv("conv", "x", "c", inits=inits),
             helper.make_node("MaxPool", ["c"], ["p"], name="side", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             _conv("conv2", "m", "d", channels_in=4, inits=inits),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    model = _model(nodes, inits)
    options = RewriteOptions(interpolate_late=False)
    perforated, report = rewrite_with_report(model, {"conv": masks.grid((8, 8), 0.5)}, options)
    assert any(name.startswith("mul") for name in report.layers[0].compact)
    explicit = rewrite(model, {"conv": masks.grid((8, 8), 0.5)}, fuse=False, compact=False)
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    tolerance = 1e-5 if backend == "reference" else 1e-4
    got = run_backend(backend, perforated, x)[0]
    np.testing.assert_allclose(got, _run(explicit, x), rtol=tolerance, atol=tolerance)


def test_options_and_flags_are_one_choice():
    assert RewriteOptions.from_flags(fuse=False, interpolate_late=True) == RewriteOptions(
        fold_batchnorm=False, fuse_activation=False, interpolate_late=True)
    with pytest.raises(TypeError, match="either options or the flags"):
        rewrite(onnx.ModelProto(), {}, RewriteOptions(), fuse=False)


@pytest.mark.parametrize("between, tied", [("Elu", True), ("PRelu", True), ("MaxPool", False)])
def test_tuner_regions_follow_the_table(between, tied):
    inits = {"slope": np.full((4, 1, 1), 0.1)}
    inputs = ["c", "slope"] if between == "PRelu" else ["c"]
    attrs = {"kernel_shape": [1, 1]} if between == "MaxPool" else {}
    nodes = [_conv("a", "x", "c", inits=inits), helper.make_node(between, inputs, ["e"], name="between", **attrs),
             _conv("b", "e", "y", channels_in=4, inits=inits)]
    model = onnx.shape_inference.infer_shapes(_model(nodes, inits))
    regions = compact_regions(model, ["a", "b"])
    assert (list(regions.values()) == [["a", "b"]]) is tied


def test_pooling_masks_follow_the_table_and_stop_at_a_spatial_concat():
    inits = {}
    nodes = [_conv("conv", "x", "c", inits=inits), helper.make_node("Elu", ["c"], ["e"]),
             helper.make_node("MaxPool", ["e"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    weights, details = masks.pooling_weights(_model(nodes, inits), "conv")
    assert details == {"pool": "y"} and weights.shape == (8, 8)
    nodes[1] = helper.make_node("Concat", ["c", "c"], ["e"], axis=2)
    with pytest.raises(onnx_perforate.PerforateError, match="no MaxPool"):
        masks.pooling_weights(_model(nodes, inits), "conv")
