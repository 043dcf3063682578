"""The BatchNormalization-folding pass (onnx_perforate/passes/batchnorm.py), through rewrite(): a BN after
the Conv is folded into its weights unless something else reads the Conv's output."""

from __future__ import annotations

from onnx import helper

from onnx_perforate.rewrite import rewrite_with_report

from helpers import assert_reproduces, bn, conv_model, ones_for, unary


def test_batchnorm_is_folded_and_activation_fused(backend):
    model = conv_model(after=[bn, unary("Relu")])
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    ops_left = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in ops_left and "Relu" not in ops_left
    (layer,) = report.layers
    assert layer.folded_batchnorm == "bn" and layer.fused_activation == "Relu"
    conv = next(n for n in out.graph.node if n.op_type == "PerforatedConv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "activation")) == b"Relu"
    assert_reproduces(model, backend)


def test_batchnorm_not_folded_when_output_is_shared(backend):
    def shared(prev):  # the Conv output feeds both BN and an Add
        nodes, inits, out = bn(prev)
        nodes.append(helper.make_node("Add", [out, prev], ["sum"], name="sum"))
        return nodes, inits, "sum"

    model = conv_model(after=[shared])
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    assert report.layers[0].folded_batchnorm is None
    assert "2 consumers" in report.layers[0].skipped["fold_batchnorm"]
    assert_reproduces(model, backend)
