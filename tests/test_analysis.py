"""One analysed model (onnx_perforate.analysis): accepted wherever a model is, read and never
changed, and one ``tune`` call loads, checks and infers the model once."""

from __future__ import annotations

import onnx_perforate
from onnx_perforate import analysis, graph, masks
from onnx_perforate.analysis import AnalysedModel, analyse
from onnx_perforate.impact import spatial_convs
from onnx_perforate.passes.op_table import Semantics

from helpers import labelled_batches, synthetic_cnn


def test_the_analysis_holds_shapes_geometry_consumers_and_op_kinds():
    model = synthetic_cnn()
    analysed = analyse(model)
    assert analyse(analysed) is analysed
    assert set(analysed.conv_geometry) == {"conv1", "conv2"}
    assert analysed.conv_geometry["conv1"].out_hw == (12, 12)
    conv1 = analysed.nodes["conv1"]
    readers = analysed.consumers[conv1.output[0]]
    assert [r.op_type for r in readers] == ["BatchNormalization"]
    assert analysed.op_kinds[readers[0].name or readers[0].output[0]] is Semantics.NORMALIZATION
    assert analysed.opset == graph.default_opset(model)


def test_inspect_rewrite_and_impact_accept_it_and_leave_it_unchanged():
    model = synthetic_cnn()
    analysed = AnalysedModel(model)
    before = analysed.model.SerializeToString()
    assert [r.to_dict() for r in onnx_perforate.inspect(analysed)] == [r.to_dict() for r in onnx_perforate.inspect(model)]
    assert spatial_convs(analysed) == spatial_convs(model)
    chosen = {"conv2": masks.grid((6, 6), 0.5)}
    once = onnx_perforate.rewrite(analysed, chosen)
    twice = onnx_perforate.rewrite(analysed, chosen)
    assert once.SerializeToString() == twice.SerializeToString() == onnx_perforate.rewrite(model, chosen).SerializeToString()
    assert analysed.model.SerializeToString() == before


def test_one_tune_call_infers_the_model_once(monkeypatch):
    counts = {"infer": 0, "analyse": 0}
    infer = graph.infer_shapes
    init = AnalysedModel.__init__

    def counting_infer(model):
        counts["infer"] += 1
        return infer(model)

    def counting_init(self, model):
        counts["analyse"] += 1
        init(self, model)

    monkeypatch.setattr(graph, "infer_shapes", counting_infer)
    monkeypatch.setattr(analysis, "infer_shapes", counting_infer)
    monkeypatch.setattr(AnalysedModel, "__init__", counting_init)
    result = onnx_perforate.tune(synthetic_cnn(), labelled_batches(), ladder=(0.0, 0.3, 0.6), repeats=2,
                                 mask_kind="grid", progress=False, monotone=False)  # steps whatever the load
    tried = len(result.steps)  # every step rewrote at least one candidate model
    assert tried >= 2 and any(n.op_type == "PerforatedConv" for n in result.model.graph.node)
    assert counts == {"infer": 1, "analyse": 1}
