"""The rewriter's cost model (passes/profitability.py): light perforation of layers whose output must be
interpolated is kept as plain Conv, reported with the reason; heavy or compact-chained layers stay."""

from __future__ import annotations

import numpy as np

import onnx
import pytest

from onnx_perforate import masks, runtime
from onnx_perforate.passes import profitability
from onnx_perforate.rewrite import rewrite_with_report
from helpers import GraphBuilder, assert_close, count_ops, fire, needs_library, run_backend, sample_file


def test_verdict_weighs_the_saving_against_the_interpolation():
    # SqueezeNet's fire4/expand3x3 (32 -> 128 at 27x27) at r = 0.3, then at r = 0.75.
    macs, elements = 128 * 27 * 27 * 288, 128 * 27 * 27
    assert "its interpolation costs" in profitability.verdict(macs, int(macs * 0.7), elements, True, True)
    assert profitability.verdict(macs, int(macs * 0.25), elements, True, True) == ""
    # Kept compact (no interpolation): a light rate still pays on a long reduction...
    assert profitability.verdict(macs, int(macs * 0.7), elements, True, False) == ""
    # ...but not with a 3-channel input (conv1), where the kernel is least efficient.
    conv1 = 64 * 111 * 111 * 27
    assert "patch 27" in profitability.verdict(conv1, int(conv1 * 0.7), 64 * 111 * 111, True, False)


def test_unprofitable_layers_stay_plain_and_are_reported():
    g = GraphBuilder(hw=10)
    a = g.conv("a", "x", 4, 8)  # patch 36: at a light rate our kernel is slower than ORT's Conv
    b = g.conv("b", a, 8, 8, k=3, pad=1)
    model = g.model([g.op("GlobalAveragePool", [b], "gap")])  # b stays compact: no interpolation
    chosen = {"a": masks.uniform((10, 10), 0.2, seed=1), "b": masks.grid((10, 10), 0.75)}
    out, report = rewrite_with_report(model, chosen, skip_unprofitable=True)
    assert set(report.kept_plain) == {"a"} and "kept as plain Conv" in report.kept_plain["a"]
    assert [layer.key for layer in report.layers] == ["b"]
    assert count_ops(out, "Conv") == 1 and count_ops(out, "PerforatedConv") == 1
    assert "a: kept as plain Conv" in report.format()
    # The same request without the option perforates both; with every layer unprofitable the model
    # comes back unperforated.
    _, everything = rewrite_with_report(model, chosen)
    assert [layer.key for layer in everything.layers] == ["a", "b"] and not everything.kept_plain
    light = {"a": masks.uniform((10, 10), 0.1, seed=1), "b": masks.uniform((10, 10), 0.1, seed=2)}
    out, report = rewrite_with_report(model, light, skip_unprofitable=True)
    assert set(report.kept_plain) == {"a", "b"} and count_ops(out, "PerforatedConv") == 0 and report.mac_reduction == 1.0


def test_profitable_rewrite_agrees_with_the_explicit_form(backend):
    g = GraphBuilder(hw=10)
    a = g.conv("a", "x", 4, 8)
    b = g.conv("b", a, 8, 8, k=1)
    model = g.model([g.op("GlobalAveragePool", [b], "gap")])
    chosen = {"a": masks.grid((10, 10), 0.75), "b": masks.grid((10, 10), 0.75)}
    out, report = rewrite_with_report(model, chosen, skip_unprofitable=True)
    assert not report.kept_plain  # a chain that stays compact pays
    x = np.random.default_rng(0).normal(size=(2, 4, 10, 10)).astype(np.float32)
    explicit = rewrite_with_report(model, chosen, compact=False)[0]
    assert_close(run_backend(backend, out, x)[0], run_backend(backend, explicit, x)[0])


def _ort_reorders(model, tmp_path) -> int:
    """ReorderInput/ReorderOutput nodes in ORT's optimised graph of ``model`` (this machine's NCHWc)."""
    path = tmp_path / "optimised.onnx"
    runtime.session(model, 1, quiet=True, optimized_model_filepath=str(path))
    return sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in onnx.load(path).graph.node)


@needs_library
@pytest.mark.parametrize("perforate", [[], ["f1_e3"], ["f1_e3", "f2_e3"], ["f1_sq", "f1_e1", "f1_e3"]])
def test_nchwc_reorders_predict_ort(perforate, tmp_path):
    """The report's layout reorders are the ones ORT inserts: fire modules (16-channel blocks, as ORT's
    NCHWc kernels want) with some Convs perforated."""
    g = GraphBuilder(channels=32, hw=12)
    x = g.op("MaxPool", ["x"], "pool", kernel_shape=[2, 2], strides=[1, 1])
    f1 = fire(g, x, 32, "f1", squeeze=16, expand=16)
    f2 = fire(g, f1, 32, "f2", squeeze=16, expand=16)
    model = g.model([g.op("GlobalAveragePool", [f2], "gap")])
    if not perforate:
        assert len(profitability.nchwc_reorders(model)) == _ort_reorders(model, tmp_path)
        return
    shape = (11, 11)
    out, report = rewrite_with_report(model, {name: masks.uniform(shape, 0.3, seed=1) for name in perforate})
    assert len(report.nchwc_reorders) == _ort_reorders(out, tmp_path) > 0
    assert report.nchwc_reorders_original == _ort_reorders(model, tmp_path)
    assert f"expect {len(report.nchwc_reorders)} layout reorders" in report.format()
    assert report.to_dict()["nchwc_reorders"] == report.nchwc_reorders


@needs_library
@pytest.mark.parametrize("layers", [["conv1"], ["conv2"], ["conv4"], ["conv5"], ["conv1", "conv3", "conv5"]])
def test_nchwc_reorders_predict_ort_on_the_sample_model(layers, tmp_path):
    """The bundled CNN: a first layer with one input channel, BatchNormalizations, pools whose channel
    count ORT cannot infer behind a custom op."""
    model = onnx.load(sample_file("fashion_cnn.onnx"))
    shapes = {"conv1": (28, 28), "conv2": (28, 28), "conv3": (14, 14), "conv4": (14, 14), "conv5": (7, 7)}
    out, report = rewrite_with_report(model, {name: masks.uniform(shapes[name], 0.3, seed=1) for name in layers})
    assert len(report.nchwc_reorders) == _ort_reorders(out, tmp_path)
    assert report.nchwc_reorders_original == _ort_reorders(model, tmp_path) == 1
