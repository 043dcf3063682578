"""The compact pass of rewrite(): every rewrite agrees with the explicit form (compact=False) of the same
masks on random inputs, in ORT and in the reference evaluator, and the graphs are structurally compact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_perforate
from onnx_perforate import masks
from onnx_perforate.passes.compact import CompactOptions
from onnx_perforate.rewrite import rewrite, rewrite_with_report

from helpers import (
    GraphBuilder,
    assert_close,
    chained_perforated_convs,
    count_ops,
    fire,
    layer_masks,
    needs_library,
    run_backend,
    run_ort,
    run_reference,
    sample_file,
    shared_file,
)

RNG = np.random.default_rng(1)


def check_agreement(model, chosen, backend, *, batch=2):
    """Compact and explicit forms of the same masks agree on `backend`; on the library, the explicit
    form agrees with the reference evaluator too."""
    explicit = rewrite(model, chosen, compact=False)
    compact, report = rewrite_with_report(model, chosen)
    onnx.checker.check_model(compact, full_check=True)
    x = RNG.normal(size=(batch, 4, 10, 10)).astype(np.float32) + 0.5
    want = run_backend(backend, explicit, x)
    for got, expected in zip(run_backend(backend, compact, x), want, strict=True):
        assert_close(got, expected)
    if backend != "reference":
        for got, expected in zip(want, run_reference(explicit, x), strict=True):
            assert_close(got, expected, rtol=1e-4)
    # original names keep meaning the full tensor; graph outputs are unchanged
    assert [o.name for o in compact.graph.output] == [o.name for o in model.graph.output]
    return compact, report


def test_conv3x3_relu_then_1x1_conv(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 8)
    b = g.conv("b", a, 8, 6, k=1)
    model = g.model([b])
    compact, report = check_agreement(model, layer_masks(model, ["a"]), backend)
    assert count_ops(compact, "NNInterpolate") == 1
    (layer,) = report.layers
    assert any(c.startswith("b (1x1 GEMM + Relu)") for c in layer.compact)
    assert "graph output 'b_relu'" in layer.interpolated_for
    assert report.compact_saved_macs > 0
    assert "stays compact through" in report.format()


@pytest.mark.parametrize("perforate", [["f1_sq", "f1_e3"], ["f1_sq", "f1_e1", "f1_e3"], ["f1_sq", "f1_e1", "f1_e3", "f2_sq", "f2_e3"]])
def test_fire_modules(perforate, backend):
    g = GraphBuilder()
    c1 = fire(g, "x", 4, "f1")
    c2 = fire(g, c1, 8, "f2")
    model = g.model([c2])
    compact, report = check_agreement(model, layer_masks(model, perforate), backend)
    by = {l.node: l for l in report.layers}
    assert any(c == "f1_cat" for l in report.layers for c in l.compact)
    # the graph output, and f2's squeeze output when f2's 3x3 expand is not perforated
    assert count_ops(compact, "NNInterpolate") == (1 if "f2_e3" in perforate else 2)
    # the squeeze output is read compact by both expands
    assert by["f1_e3"].implicit_input == "f1_sq"


def test_fire_with_unperforated_3x3_interpolates_and_says_why(backend):
    g = GraphBuilder()
    c1 = fire(g, "x", 4, "f1")
    model = g.model([c1])
    compact, report = check_agreement(model, layer_masks(model, ["f1_sq"]), backend)
    why = report.layers[0].interpolated_for
    assert "spatial Conv" in why["f1_e3"]


def test_residual_add_and_mul_same_mask(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 4)
    b = g.conv("b", a, 4, 4)
    s = g.op("Add", [a, b], "res")
    m = g.op("Mul", [s, a], "gate")
    c = g.conv("c", m, 4, 4, k=1)
    model = g.model([c])
    compact, report = check_agreement(model, layer_masks(model, ["a", "b"]), backend)
    assert count_ops(compact, "NNInterpolate") == 1


def test_residual_with_different_masks_interpolates(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 4)
    b = g.conv("b", a, 4, 4)
    s = g.op("Add", [a, b], "res")
    model = g.model([s])
    chosen = layer_masks(model, ["a"])
    chosen["b"] = masks.uniform((10, 10), 0.3, seed=5)
    compact, report = check_agreement(model, chosen, backend)
    assert "different masks" in report.layers[1].interpolated_for["res"]


def test_add_with_full_operand_and_per_channel_constants(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 4)
    g.inits.append(numpy_helper.from_array(RNG.normal(size=(4, 1, 1)).astype(np.float32), "pc"))
    p = g.op("Mul", [a, "pc"], "scaled")
    q = g.op("Sigmoid", [p], "sig")
    full = g.op("Add", [q, "x"], "mixed")  # x is a full tensor: needs interpolation
    model = g.model([full])
    compact, report = check_agreement(model, layer_masks(model, ["a"]), backend)
    assert "full (non-constant)" in report.layers[0].interpolated_for["mixed"]


@pytest.mark.parametrize("head", ["gap", "mean1", "mean0", "gmp", "sum"])
def test_spatial_reduction_heads(head, backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    if head == "gap":
        y = g.op("GlobalAveragePool", [a], "y")
    elif head == "gmp":
        y = g.op("GlobalMaxPool", [a], "y")
    elif head == "sum":
        g.inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
        y = g.op("ReduceSum", [a, "axes"], "y", keepdims=1)
    else:
        y = g.op("ReduceMean", [a], "y", axes=[2, 3], keepdims=int(head[-1]))
    model = g.model([y])
    for kind in ("grid", "uniform"):
        compact, report = check_agreement(model, layer_masks(model, ["a"], rate=0.6, kind=kind), backend)
        assert count_ops(compact, "NNInterpolate") == 0


def test_reduce_mean_opset18_axes_input(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    g.inits.append(numpy_helper.from_array(np.array([-1, -2], np.int64), "axes"))
    y = g.op("ReduceMean", [a, "axes"], "y", keepdims=0)
    model = g.model([y], opset=18)
    compact, _ = check_agreement(model, layer_masks(model, ["a"]), backend)
    assert count_ops(compact, "NNInterpolate") == 0


def test_perforated_conv_reads_compact_input_through_x_index(backend):
    model, chosen = chained_perforated_convs()
    compact, report = check_agreement(model, chosen, backend)
    conv_b = next(n for n in compact.graph.node if n.name == "b")
    assert len(conv_b.input) == 5 and conv_b.input[4] == "a.nn_index"
    assert report.layers[1].implicit_input == "a"


def test_multiple_consumers_share_one_interpolation(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    b = g.conv("b", a, 6, 6, k=1)  # compact
    p = g.op("SpaceToDepth", [a], "s2d", blocksize=2)  # needs the full tensor
    q = g.op("LpPool", [a], "lp", kernel_shape=[2, 2], strides=[2, 2])  # needs it too
    model = g.model([b, p, q])
    compact, report = check_agreement(model, layer_masks(model, ["a"]), backend)
    assert count_ops(compact, "NNInterpolate") == 2  # one for a_relu (s2d, lp), one for the output b_relu
    assert set(report.layers[0].interpolated_for) >= {"s2d", "lp"}


@pytest.mark.parametrize("kind", ["grid", "uniform"])
def test_pooling_reads_the_compact_tensor(kind, backend):
    """MaxPool / AveragePool (ceil mode, pads, count_include_pad) become CompactPool: no NNInterpolate."""
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    q = g.op("AveragePool", [a], "avg", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
    r = g.op("AveragePool", [a], "avg_nopad", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])
    model = g.model([p, q, r])
    compact, report = check_agreement(model, layer_masks(model, ["a"], rate=0.8, kind=kind), backend)
    assert count_ops(compact, "NNInterpolate") == 0 and count_ops(compact, "CompactPool") == 3
    assert count_ops(compact, "MaxPool") == count_ops(compact, "AveragePool") == 0
    assert any(s.startswith("pool (CompactPool") for s in report.layers[0].compact)


def test_dense_compact_input_keeps_interpolation_before_pooling(backend):
    """Light perforation: the windows read more distinct entries than NNInterpolate + pooling costs."""
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[3, 3], strides=[2, 2])
    model = g.model([p])
    compact, report = check_agreement(model, layer_masks(model, ["a"], rate=0.2, kind="uniform"), backend)
    assert count_ops(compact, "CompactPool") == 0 and count_ops(compact, "NNInterpolate") == 1
    assert "more than NNInterpolate + MaxPool cost" in report.layers[0].interpolated_for["pool"]


def test_pooling_counts_the_layout_reorder_ort_puts_before_a_blocked_pool(backend):
    """16 channels (a multiple of every NCHWc block): ORT would reorder NNInterpolate's output before its
    blocked MaxPool, which tips the same light mask over to CompactPool."""
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 16)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[3, 3], strides=[2, 2])
    model = g.model([p])
    chosen = layer_masks(model, ["a"], rate=0.2, kind="uniform")
    without, report = rewrite_with_report(model, chosen, compact_options=CompactOptions(pool_reorder_cost=0))
    assert count_ops(without, "CompactPool") == 0
    assert "more than NNInterpolate + MaxPool cost" in report.layers[0].interpolated_for["pool"]
    compact, report = check_agreement(model, chosen, backend)
    assert count_ops(compact, "CompactPool") == 1 and count_ops(compact, "NNInterpolate") == 0
    assert "pool" not in report.layers[0].interpolated_for


def test_pooling_feeding_perforated_1x1_pools_only_its_positions(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b = g.conv("b", p, 6, 5, k=1)
    model = g.model([b])
    chosen = layer_masks(model, ["a", "b"], rate=0.5)
    compact, report = check_agreement(model, chosen, backend)
    pool = next(n for n in compact.graph.node if n.op_type == "CompactPool")
    assert len(pool.input) == 3  # Y_positions: only b's computed positions
    positions = next(i for i in compact.graph.initializer if i.name == pool.input[2])
    assert numpy_helper.to_array(positions).tolist() == np.flatnonzero(chosen["b"].array).tolist()
    assert count_ops(compact, "NNInterpolate") == 1  # b's output, a graph output
    assert report.layers[1].implicit_input == "a"


def test_pooled_output_stays_compact_when_windows_repeat(backend):
    """A mask coarser than the pooling stride: many windows read the same entries, computed once."""
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[2, 2], strides=[2, 2])
    t = g.op("Relu", [p], "t")
    model = g.model([t])
    mask = np.zeros((10, 10), bool)
    mask[::5, ::5] = True  # rows 0-2 show row 0, rows 3-9 row 5: 3 distinct row windows of 5 (same for columns)
    compact, report = check_agreement(model, {"a": masks.Mask(mask)}, backend)
    pool = next(n for n in compact.graph.node if n.op_type == "CompactPool")
    assert len(pool.input) == 3 and "9 distinct windows of 25" in " ".join(report.layers[0].compact)
    assert count_ops(compact, "NNInterpolate") == 1  # after the Relu, which ran on the compact pooled tensor


def test_graph_output_that_could_stay_compact(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    t = g.op("Tanh", [a], "t")
    b = g.conv("b", t, 6, 4, k=1)
    model = g.model([t, b])
    compact, report = check_agreement(model, layer_masks(model, ["a"]), backend)
    assert "graph output 't'" in report.layers[0].interpolated_for


def test_dropout_and_batchnorm_stay_compact_and_implicit_option(backend):
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    for name, value in (("g", RNG.uniform(0.5, 1.5, 6)), ("be", RNG.normal(size=6)), ("m", RNG.normal(size=6)),
                        ("v", RNG.uniform(0.5, 2, 6))):
        g.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    d = g.op("Dropout", [a], "drop")
    bn = g.op("BatchNormalization", [d, "g", "be", "m", "v"], "bn")
    c = g.conv("c", bn, 6, 4)  # unperforated 3x3
    model = g.model([c], opset=15)
    chosen = layer_masks(model, ["a"])
    compact, report = check_agreement(model, chosen, backend)
    assert count_ops(compact, "Dropout") == 0 and count_ops(compact, "NNInterpolate") == 1
    implicit = rewrite(model, chosen, compact_options=CompactOptions(implicit_unperforated_spatial=True))
    assert count_ops(implicit, "NNInterpolate") == 0
    x = RNG.normal(size=(1, 4, 10, 10)).astype(np.float32)
    want = run_reference(rewrite(model, chosen, compact=False), x)[0]
    assert_close(run_backend(backend, implicit, x)[0], want)


def test_compact_false_is_the_explicit_form():
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    b = g.conv("b", a, 6, 4, k=1)
    model = g.model([b])
    explicit, report = rewrite_with_report(model, layer_masks(model, ["a"]), compact=False)
    assert count_ops(explicit, "NNInterpolate") == 1 and count_ops(explicit, "Conv") == 1
    assert report.layers[0].compact == [] and report.compact_saved_macs == 0


@pytest.mark.parametrize("stem", ["fashion_cnn", "fashion_squeeze"])
def test_sample_models_compact_agrees(stem, backend):
    model = onnx.load(sample_file(f"{stem}.onnx"))
    records = [r for r in onnx_perforate.inspect(model) if r.perforable][1:]
    chosen = {r.name: masks.grid(r.output_shape[2:], 0.5) for r in records}
    explicit = rewrite(model, chosen, compact=False)
    compact = rewrite(model, chosen)
    name = model.graph.input[0].name
    with np.load(sample_file("fashion_mnist_subset.npz")) as data:
        key = next(k for k in data.files if k in (name, "images", "x"))
        x = data[key][:4].astype(np.float32).reshape(4, 1, 28, 28)
    want = run_reference(explicit, x)[0]
    assert_close(run_backend(backend, compact, x)[0], want)


@pytest.mark.shared
@needs_library
def test_squeezenet_compact_agrees_and_is_compact():
    model = onnx.load(shared_file("data", "imagenet", "squeezenet1.1.onnx"))
    records = [r for r in onnx_perforate.inspect(model) if r.perforable and r.name != "conv1_1"]
    chosen = {r.name: masks.grid(r.output_shape[2:], 0.5) for r in records}
    explicit = rewrite(model, chosen, compact=False)
    compact, report = rewrite_with_report(model, chosen)
    # everything stays compact: the MaxPools after fire3 and fire5 read their compact inputs (CompactPool)
    assert count_ops(explicit, "NNInterpolate") == 25 and count_ops(compact, "NNInterpolate") == 0
    assert count_ops(compact, "CompactPool") == 2
    assert count_ops(compact, "GlobalAveragePool") == 0 and count_ops(compact, "Dropout") == 0
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32) * 50
    outs = [run_ort(m, {"data_0": x})[0] for m in (explicit, compact)]
    assert_close(outs[1], outs[0])
    assert report.mac_reduction > 1.7
