"""The activation-fusion pass (onnx_perforate/passes/activation.py), through rewrite(): Relu, LeakyRelu
and Clip with constant bounds become PerforatedConv's `activation`; a Clip with a computed bound does not."""

from __future__ import annotations

import pytest
from onnx import helper

from onnx_perforate.rewrite import rewrite_with_report

from helpers import assert_reproduces, conv_model, f32, ones_for, unary


@pytest.mark.parametrize("opset", [10, 13])
def test_clip_fused_with_attributes_or_constant_inputs(opset, backend):
    if opset < 11:
        clip = unary("Clip", min=-0.5, max=0.7)
    else:
        def clip(prev):
            inits = [f32("lo", -0.5), f32("hi", 0.7)]
            return [helper.make_node("Clip", [prev, "lo", "hi"], ["clip"], name="clip")], inits, "clip"
    model = conv_model(after=[clip], opset=opset)
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    assert report.layers[0].fused_activation == "Clip"
    conv = next(n for n in out.graph.node if n.op_type == "PerforatedConv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["clip_min"] == pytest.approx(-0.5) and attrs["clip_max"] == pytest.approx(0.7)
    assert_reproduces(model, backend)


def test_clip_with_computed_bound_is_not_fused_but_interpolated_late(backend):
    def clip(prev):
        nodes = [helper.make_node("ReduceMax", ["x"], ["hi"], name="hi", keepdims=0),
                 helper.make_node("Clip", [prev, "", "hi"], ["clip"], name="clip")]
        return nodes, [], "clip"

    model = conv_model(after=[clip])
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    layer = report.layers[0]
    assert layer.fused_activation is None and "non-constant" in layer.skipped["fuse_activation"]
    assert layer.interpolated_late == ["clip"]
    assert_reproduces(model, backend)
