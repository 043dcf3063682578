"""The compact pass of rewrite(): every rewrite agrees with the explicit form (compact=False) of the same
masks on random inputs, in ORT and in the reference evaluator, and the graphs are structurally compact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import masks, ops
from onnx_perforate.rewrite import rewrite, rewrite_with_report

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = ROOT / "sample_models"
SQUEEZENET = ROOT.parent / "shared" / "data" / "imagenet" / "squeezenet1.1.onnx"

RNG = np.random.default_rng(1)
needs_library = pytest.mark.skipif(not onnx_perforate.has_library(), reason="compiled custom-op library not found")


def _w(name, *shape):
    return numpy_helper.from_array((RNG.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def _b(name, n):
    return numpy_helper.from_array(RNG.normal(size=n).astype(np.float32) * 0.1, name)


class G:
    """A tiny graph builder: x [N, 4, 10, 10] in, outputs named at the end."""

    def __init__(self, channels=4, hw=10):
        self.nodes, self.inits, self.channels, self.hw = [], [], channels, hw

    def conv(self, name, x, cin, cout, k=3, pad=None, stride=1, relu=True):
        pad = (k // 2) if pad is None else pad
        self.inits += [_w(f"{name}_w", cout, cin, k, k), _b(f"{name}_b", cout)]
        out = f"{name}_out"
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name,
                                           kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2))
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            return f"{name}_relu"
        return out

    def op(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, outputs, opset=13):
        graph = helper.make_graph(
            self.nodes, "compact", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", self.channels, self.hw, self.hw])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return onnx.shape_inference.infer_shapes(model)


def grid(model, names, rate=0.5, kind="grid"):
    records = {r.name: r for r in onnx_perforate.inspect(model)}
    make = masks.grid if kind == "grid" else (lambda s, r: masks.uniform(s, r, seed=3))
    return {n: make(records[n].output_shape[2:], rate) for n in names}


def run_ort(model, x):
    options = onnx_perforate.session_options(1)
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def count(model, op):
    return sum(n.op_type == op for n in model.graph.node)


def check_agreement(model, chosen, *, batch=2):
    """Compact and explicit forms of the same masks agree in ORT and in the reference evaluator."""
    explicit = rewrite(model, chosen, compact=False)
    compact, report = rewrite_with_report(model, chosen)
    onnx.checker.check_model(compact, full_check=True)
    x = RNG.normal(size=(batch, 4, 10, 10)).astype(np.float32) + 0.5
    want = ops.reference_evaluator(explicit).run(None, {"x": x})
    got = ops.reference_evaluator(compact).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(np.abs(w).max(), 1e-6))
    if onnx_perforate.has_library():
        want_ort = run_ort(explicit, x)
        for g, w, r in zip(run_ort(compact, x), want_ort, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(np.abs(w).max(), 1e-6))
            np.testing.assert_allclose(w, r, rtol=1e-4, atol=1e-4 * max(np.abs(r).max(), 1e-6))
    # original names keep meaning the full tensor; graph outputs are unchanged
    assert [o.name for o in compact.graph.output] == [o.name for o in model.graph.output]
    return compact, report


def test_conv3x3_relu_then_1x1_conv():
    g = G()
    a = g.conv("a", "x", 4, 8)
    b = g.conv("b", a, 8, 6, k=1)
    model = g.model([b])
    compact, report = check_agreement(model, grid(model, ["a"]))
    assert count(compact, "NNInterpolate") == 1
    (layer,) = report.layers
    assert any(c.startswith("b (1x1 GEMM + Relu)") for c in layer.compact)
    assert "graph output 'b_relu'" in layer.interpolated_for
    assert report.compact_saved_macs > 0
    assert "stays compact through" in report.format()


def fire(g, x, cin, name, squeeze=3, expand=4):
    s = g.conv(f"{name}_sq", x, cin, squeeze, k=1)
    e1 = g.conv(f"{name}_e1", s, squeeze, expand, k=1)
    e3 = g.conv(f"{name}_e3", s, squeeze, expand, k=3)
    return g.op("Concat", [e1, e3], f"{name}_cat", axis=1)


@pytest.mark.parametrize("perforate", [["f1_sq", "f1_e3"], ["f1_sq", "f1_e1", "f1_e3"], ["f1_sq", "f1_e1", "f1_e3", "f2_sq", "f2_e3"]])
def test_fire_modules(perforate):
    g = G()
    c1 = fire(g, "x", 4, "f1")
    c2 = fire(g, c1, 8, "f2")
    model = g.model([c2])
    compact, report = check_agreement(model, grid(model, perforate))
    by = {l.node: l for l in report.layers}
    assert any(c == "f1_cat" for l in report.layers for c in l.compact)
    # the graph output, and f2's squeeze output when f2's 3x3 expand is not perforated
    assert count(compact, "NNInterpolate") == (1 if "f2_e3" in perforate else 2)
    # the squeeze output is read compact by both expands
    assert by["f1_e3"].implicit_input == "f1_sq"


def test_fire_with_unperforated_3x3_interpolates_and_says_why():
    g = G()
    c1 = fire(g, "x", 4, "f1")
    model = g.model([c1])
    compact, report = check_agreement(model, grid(model, ["f1_sq"]))
    why = report.layers[0].interpolated_for
    assert "spatial Conv" in why["f1_e3"]


def test_residual_add_and_mul_same_mask():
    g = G()
    a = g.conv("a", "x", 4, 4)
    b = g.conv("b", a, 4, 4)
    s = g.op("Add", [a, b], "res")
    m = g.op("Mul", [s, a], "gate")
    c = g.conv("c", m, 4, 4, k=1)
    model = g.model([c])
    compact, report = check_agreement(model, grid(model, ["a", "b"]))
    assert count(compact, "NNInterpolate") == 1


def test_residual_with_different_masks_interpolates():
    g = G()
    a = g.conv("a", "x", 4, 4)
    b = g.conv("b", a, 4, 4)
    s = g.op("Add", [a, b], "res")
    model = g.model([s])
    chosen = grid(model, ["a"])
    chosen["b"] = masks.uniform((10, 10), 0.3, seed=5)
    compact, report = check_agreement(model, chosen)
    assert "different masks" in report.layers[1].interpolated_for["res"]


def test_add_with_full_operand_and_per_channel_constants():
    g = G()
    a = g.conv("a", "x", 4, 4)
    g.inits.append(numpy_helper.from_array(RNG.normal(size=(4, 1, 1)).astype(np.float32), "pc"))
    p = g.op("Mul", [a, "pc"], "scaled")
    q = g.op("Sigmoid", [p], "sig")
    full = g.op("Add", [q, "x"], "mixed")  # x is a full tensor: needs interpolation
    model = g.model([full])
    compact, report = check_agreement(model, grid(model, ["a"]))
    assert "full (non-constant)" in report.layers[0].interpolated_for["mixed"]


@pytest.mark.parametrize("head", ["gap", "mean1", "mean0", "gmp", "sum"])
def test_spatial_reduction_heads(head):
    g = G()
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
        compact, report = check_agreement(model, grid(model, ["a"], rate=0.6, kind=kind))
        assert count(compact, "NNInterpolate") == 0


def test_reduce_mean_opset18_axes_input():
    g = G()
    a = g.conv("a", "x", 4, 6)
    g.inits.append(numpy_helper.from_array(np.array([-1, -2], np.int64), "axes"))
    y = g.op("ReduceMean", [a, "axes"], "y", keepdims=0)
    model = g.model([y], opset=18)
    compact, _ = check_agreement(model, grid(model, ["a"]))
    assert count(compact, "NNInterpolate") == 0


def chained_perforated_convs(with_1x1=False):
    """conv a (3x3) -> conv b (3x3, stride 2) [-> conv c (1x1)], a and b perforated: b reads a's
    compact output through X_index. Returns the model and its masks."""
    g = G()
    a = g.conv("a", "x", 4, 6)
    out = g.conv("b", a, 6, 5, stride=2)
    if with_1x1:
        out = g.conv("c", out, 5, 7, k=1)
    model = g.model([out])
    chosen = grid(model, ["a"])
    chosen["b"] = masks.grid((5, 5), 0.4)
    return model, chosen


def test_perforated_conv_reads_compact_input_through_x_index():
    model, chosen = chained_perforated_convs()
    compact, report = check_agreement(model, chosen)
    conv_b = next(n for n in compact.graph.node if n.name == "b")
    assert len(conv_b.input) == 5 and conv_b.input[4] == "a.nn_index"
    assert report.layers[1].implicit_input == "a"


def test_multiple_consumers_share_one_interpolation():
    g = G()
    a = g.conv("a", "x", 4, 6)
    b = g.conv("b", a, 6, 6, k=1)  # compact
    p = g.op("SpaceToDepth", [a], "s2d", blocksize=2)  # needs the full tensor
    q = g.op("LpPool", [a], "lp", kernel_shape=[2, 2], strides=[2, 2])  # needs it too
    model = g.model([b, p, q])
    compact, report = check_agreement(model, grid(model, ["a"]))
    assert count(compact, "NNInterpolate") == 2  # one for a_relu (s2d, lp), one for the output b_relu
    assert set(report.layers[0].interpolated_for) >= {"s2d", "lp"}


@pytest.mark.parametrize("kind", ["grid", "uniform"])
def test_pooling_reads_the_compact_tensor(kind):
    """MaxPool / AveragePool (ceil mode, pads, count_include_pad) become CompactPool: no NNInterpolate."""
    g = G()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    q = g.op("AveragePool", [a], "avg", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
    r = g.op("AveragePool", [a], "avg_nopad", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])
    model = g.model([p, q, r])
    compact, report = check_agreement(model, grid(model, ["a"], rate=0.8, kind=kind))
    assert count(compact, "NNInterpolate") == 0 and count(compact, "CompactPool") == 3
    assert count(compact, "MaxPool") == count(compact, "AveragePool") == 0
    assert any(s.startswith("pool (CompactPool") for s in report.layers[0].compact)


def test_dense_compact_input_keeps_interpolation_before_pooling():
    """Light perforation: the windows read more distinct entries than NNInterpolate + pooling costs."""
    g = G()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[3, 3], strides=[2, 2])
    model = g.model([p])
    compact, report = check_agreement(model, grid(model, ["a"], rate=0.2, kind="uniform"))
    assert count(compact, "CompactPool") == 0 and count(compact, "NNInterpolate") == 1
    assert "more than NNInterpolate + MaxPool cost" in report.layers[0].interpolated_for["pool"]


def test_pooling_feeding_perforated_1x1_pools_only_its_positions():
    g = G()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b = g.conv("b", p, 6, 5, k=1)
    model = g.model([b])
    chosen = grid(model, ["a", "b"], rate=0.5)
    compact, report = check_agreement(model, chosen)
    pool = next(n for n in compact.graph.node if n.op_type == "CompactPool")
    assert len(pool.input) == 3  # Y_positions: only b's computed positions
    positions = next(i for i in compact.graph.initializer if i.name == pool.input[2])
    assert numpy_helper.to_array(positions).tolist() == np.flatnonzero(chosen["b"].array).tolist()
    assert count(compact, "NNInterpolate") == 1  # b's output, a graph output
    assert report.layers[1].implicit_input == "a"


def test_pooled_output_stays_compact_when_windows_repeat():
    """A mask coarser than the pooling stride: many windows read the same entries, computed once."""
    g = G()
    a = g.conv("a", "x", 4, 6)
    p = g.op("MaxPool", [a], "pool", kernel_shape=[2, 2], strides=[2, 2])
    t = g.op("Relu", [p], "t")
    model = g.model([t])
    mask = np.zeros((10, 10), bool)
    mask[::5, ::5] = True  # rows 0-2 show row 0, rows 3-9 row 5: 3 distinct row windows of 5 (same for columns)
    compact, report = check_agreement(model, {"a": masks.Mask(mask)})
    pool = next(n for n in compact.graph.node if n.op_type == "CompactPool")
    assert len(pool.input) == 3 and "9 distinct windows of 25" in " ".join(report.layers[0].compact)
    assert count(compact, "NNInterpolate") == 1  # after the Relu, which ran on the compact pooled tensor


def test_graph_output_that_could_stay_compact():
    g = G()
    a = g.conv("a", "x", 4, 6)
    t = g.op("Tanh", [a], "t")
    b = g.conv("b", t, 6, 4, k=1)
    model = g.model([t, b])
    compact, report = check_agreement(model, grid(model, ["a"]))
    assert "graph output 't'" in report.layers[0].interpolated_for


def test_dropout_and_batchnorm_stay_compact_and_implicit_option():
    g = G()
    a = g.conv("a", "x", 4, 6)
    for name, value in (("g", RNG.uniform(0.5, 1.5, 6)), ("be", RNG.normal(size=6)), ("m", RNG.normal(size=6)),
                        ("v", RNG.uniform(0.5, 2, 6))):
        g.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    d = g.op("Dropout", [a], "drop")
    bn = g.op("BatchNormalization", [d, "g", "be", "m", "v"], "bn")
    c = g.conv("c", bn, 6, 4)  # unperforated 3x3
    model = g.model([c], opset=15)
    chosen = grid(model, ["a"])
    compact, report = check_agreement(model, chosen)
    assert count(compact, "Dropout") == 0 and count(compact, "NNInterpolate") == 1
    from onnx_perforate.passes.compact import CompactOptions

    implicit = rewrite(model, chosen, compact_options=CompactOptions(implicit_unperforated_spatial=True))
    assert count(implicit, "NNInterpolate") == 0
    x = RNG.normal(size=(1, 4, 10, 10)).astype(np.float32)
    want = ops.reference_evaluator(rewrite(model, chosen, compact=False)).run(None, {"x": x})[0]
    got = ops.reference_evaluator(implicit).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if onnx_perforate.has_library():
        np.testing.assert_allclose(run_ort(implicit, x)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_compact_false_is_the_explicit_form():
    g = G()
    a = g.conv("a", "x", 4, 6)
    b = g.conv("b", a, 6, 4, k=1)
    model = g.model([b])
    explicit, report = rewrite_with_report(model, grid(model, ["a"]), compact=False)
    assert count(explicit, "NNInterpolate") == 1 and count(explicit, "Conv") == 1
    assert report.layers[0].compact == [] and report.compact_saved_macs == 0


@pytest.mark.skipif(not (SAMPLE_MODELS / "fashion_cnn.onnx").is_file(), reason="sample model not built")
@pytest.mark.parametrize("stem", ["fashion_cnn", "fashion_squeeze"])
def test_sample_models_compact_agrees(stem):
    path = SAMPLE_MODELS / f"{stem}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    model = onnx.load(path)
    records = [r for r in onnx_perforate.inspect(model) if r.perforable][1:]
    chosen = {r.name: masks.grid(r.output_shape[2:], 0.5) for r in records}
    explicit = rewrite(model, chosen, compact=False)
    compact = rewrite(model, chosen)
    name = model.graph.input[0].name
    with np.load(SAMPLE_MODELS / "fashion_mnist_subset.npz") as data:
        key = next(k for k in data.files if k in (name, "images", "x"))
        x = data[key][:4].astype(np.float32).reshape(4, 1, 28, 28)
    want = ops.reference_evaluator(explicit).run(None, {name: x})[0]
    np.testing.assert_allclose(ops.reference_evaluator(compact).run(None, {name: x})[0], want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    if onnx_perforate.has_library():
        options = onnx_perforate.session_options(1)
        got = ort.InferenceSession(compact.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.shared
@needs_library
@pytest.mark.skipif(not SQUEEZENET.is_file(), reason="../shared/data/imagenet/squeezenet1.1.onnx is absent")
def test_squeezenet_compact_agrees_and_is_compact():
    model = onnx.load(SQUEEZENET)
    records = [r for r in onnx_perforate.inspect(model) if r.perforable and r.name != "conv1_1"]
    chosen = {r.name: masks.grid(r.output_shape[2:], 0.5) for r in records}
    explicit = rewrite(model, chosen, compact=False)
    compact, report = rewrite_with_report(model, chosen)
    # everything stays compact: the MaxPools after fire3 and fire5 read their compact inputs (CompactPool)
    assert count(explicit, "NNInterpolate") == 25 and count(compact, "NNInterpolate") == 0
    assert count(compact, "CompactPool") == 2
    assert count(compact, "GlobalAveragePool") == 0 and count(compact, "Dropout") == 0
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32) * 50
    options = onnx_perforate.session_options(1)
    options.log_severity_level = 3
    outs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
            for m in (explicit, compact)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())
    assert report.mac_reduction > 1.7
