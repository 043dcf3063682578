"""The rewriter's cost model (passes/profitability.py): light perforation of layers whose output must be
interpolated is kept as plain Conv, reported with the reason; heavy or compact-chained layers stay."""

from __future__ import annotations

import numpy as np

from onnx_perforate import masks
from onnx_perforate.passes import profitability
from onnx_perforate.rewrite import rewrite_with_report
from helpers import GraphBuilder, assert_close, count_ops, run_backend


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
