"""The interpolate-late pass (onnx_perforate/passes/interpolate_late.py), through rewrite(): position-wise,
per-channel ops after the Conv run on the compact tensor, and the pass stops where that would change the
result or a graph output needs the full tensor."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnx_perforate.rewrite import rewrite_with_report

from helpers import assert_reproduces, assert_valid, binary, bn, build, conv_model, f32, ones_for, unary

RNG = np.random.default_rng(2)


def test_interpolate_late_moves_per_channel_ops_and_keeps_names(backend):
    after = [
        unary("Relu"),
        binary("Add", RNG.normal(size=(8, 1, 1)), name="add"),
        binary("Sub", np.float32(0.5), name="sub", const_first=True),
        lambda p: bn(p, name="bn2"),
        binary("Div", RNG.uniform(1, 2, size=(1, 8, 1, 1)), name="div"),
        unary("Tanh"),
    ]
    model = conv_model(after=after)
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    assert report.layers[0].interpolated_late == ["add", "sub", "bn2", "div", "tanh"]
    interp = next(n for n in out.graph.node if n.op_type == "NNInterpolate")
    assert list(interp.output) == ["tanh"]
    assert {"add.compact", "tanh.compact"} <= {vi.name for vi in out.graph.value_info}
    assert_reproduces(model, backend)


@pytest.mark.parametrize(
    "after, why",
    [
        ([binary("Add", RNG.normal(size=(1, 1, 12, 12)))], "not per-channel"),
        ([binary("Mul", RNG.normal(size=(12,)))], "not per-channel"),
        ([unary("MaxPool", kernel_shape=[2, 2])], "does not commute"),
    ],
)
def test_interpolate_late_stops_where_illegal(after, why, backend):
    model = conv_model(after=after)
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    assert report.layers[0].interpolated_late == []
    assert why in report.layers[0].skipped["interpolate_late"]
    assert_reproduces(model, backend)


def test_interpolate_late_stops_at_graph_output():
    w = f32("W", RNG.normal(size=(4, 3, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = build(nodes, [w], outputs=("y", "s"))
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    assert "graph output" in report.layers[0].skipped["interpolate_late"]
    assert [o.name for o in out.graph.output] == ["y", "s"]
    assert_valid(out)
