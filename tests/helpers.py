"""What the test modules share: data paths, the compiled-library requirement, the ways to run a model
(ORT with the library, the reference evaluator, the Python fallback) and small model builders.

Test modules import from here, never from one another; conftest.py turns the requirement and the
backends into fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import masks, ops

# ------------------------------------------------------------------------------------------------ data paths

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the real data (read-only, never copied into the repository)
SHARED_DATA = SHARED / "data"
SQUEEZENET = SHARED_DATA / "imagenet" / "squeezenet1.1.onnx"
CIFAR_MODEL = SHARED_DATA / "cifar10" / "cifar10_keras_cnn.onnx"
CIFAR_DATA = SHARED_DATA / "cifar10" / "cifar10_test.npz"
SAMPLE_MODELS = REPO / "sample_models"  # bundled with the repository


def shared_file(*parts: str) -> Path:
    """A file under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the real data in ../shared is not present)")
    return path


def sample_file(name: str) -> Path:
    """A file under sample_models/, or a skip naming what is missing."""
    path = SAMPLE_MODELS / name
    if not path.is_file():
        pytest.skip(f"needs {path} (the sample models are not built)")
    return path


# ------------------------------------------------------------------------------------------------ the library

REQUIRE_LIBRARY_VARIABLE = "ONNX_PERFORATE_REQUIRE_LIBRARY"


def require_library() -> None:
    """Skips the calling test when the compiled custom-op library is missing, or fails it when
    ONNX_PERFORATE_REQUIRE_LIBRARY=1 (as scripts/run_tests.sh sets): CI must not skip silently."""
    if onnx_perforate.has_library():
        return
    message = "the compiled custom-op library is not built (pip install . builds it)"
    if os.environ.get(REQUIRE_LIBRARY_VARIABLE) == "1":
        pytest.fail(message)
    pytest.skip(message)


# Marks a test (or, as `pytestmark`, a module) that needs the library; see require_library.
needs_library = pytest.mark.usefixtures("require_library")


# ------------------------------------------------------------------------------------------------ running models


# ORT's uint8 x int8 QLinearConv on x86 CPUs without VNNI adds pairs of products in int16 with saturation
# (vpmaddubsw), so it is not exact for full-range int8 weights there; our kernels are. Weights within +-64
# keep each pair sum below 2^15, where ORT is exact on every CPU: tests that compare with ORT's INT8 result
# bit for bit use such weights (quantize_static's reduce_range gives them). Full-range weights are checked
# against the numpy reference.
ORT_EXACT_WEIGHT_MAX = 64
ORT_EXACT_QUANTIZATION = {"reduce_range": True}


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def as_feeds(model: onnx.ModelProto, feeds) -> dict:
    """`feeds` as a dict: an array alone feeds the model's first graph input."""
    return feeds if isinstance(feeds, dict) else {graph_inputs(model)[0]: feeds}


def run_ort(model: onnx.ModelProto, feeds, *, threads: int = 1, library: bool = True) -> list[np.ndarray]:
    """All outputs of `model` on ORT's CPU provider, with the compiled custom-op library registered
    (library=True) or with plain ORT session options (library=False, for standard-ONNX models)."""
    if library:
        options = onnx_perforate.session_options(threads)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, as_feeds(model, feeds))


def changing_index_runs(nodes, x_type, initializers, side: int, computed: int, threads: int = 2):
    """A session of ``nodes`` whose x, mask, X_index and index are graph inputs, and the (producer, mask)
    pairs to feed it run after run. Equal seeds give equal values in fresh buffers (a plan cached per
    index is then reused); the mask and the producer's positions change one at a time, always
    ``computed`` positions, so K_in alone does not tell them apart and a cache ignoring either index
    gives wrong results."""
    graph = helper.make_graph(
        nodes, "dynamic",
        [helper.make_tensor_value_info("x", x_type, None),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, None),
         helper.make_tensor_value_info("x_index", TensorProto.INT64, None),
         helper.make_tensor_value_info("index", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("y", x_type, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    session = ort.InferenceSession(model.SerializeToString(), onnx_perforate.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    runs = []
    for mask_seed, producer_seed in [(0, 0), (0, 0), (1, 0), (1, 1), (1, 1), (0, 1)]:
        producer = np.zeros((side, side), bool)
        producer.flat[np.random.default_rng(200 + producer_seed).choice(side * side, computed, replace=False)] = True
        mask = np.random.default_rng(100 + mask_seed).random((side, side)) < 0.5
        mask[0, 0] = True
        runs.append((producer, mask))
    return session, runs


def run_reference(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    """All outputs of `model` in onnx.reference, with the package's numpy implementations of its ops."""
    return ops.reference_evaluator(model).run(None, as_feeds(model, feeds))


def run_fallback(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    """All outputs of `model` in ORT through the Python-op fallback (no compiled library)."""
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions (the fallback's dependency) "
                                                         "is not installed")
    from onnx_perforate import fallback

    return fallback.fallback_session(model).run(None, as_feeds(model, feeds))


# The independent ways to run a perforated model. Tests take them through the `backend` fixture
# (conftest.py), so a missing library shows as a skipped (or, in CI, failed) case, never as a check
# that quietly did not run.
BACKENDS = {"library": run_ort, "reference": run_reference, "fallback": run_fallback}


def run_backend(backend: str, model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return BACKENDS[backend](model, feeds)


def assert_close(got, want, rtol=1e-5):
    """Equal within float32 rounding at the scale of `want`."""
    scale = max(float(np.abs(want).max()), 1e-6) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float64: initializers, Constant nodes, declared types, Casts."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph

    def widen(tensor):
        array = numpy_helper.to_array(tensor)
        return numpy_helper.from_array(array.astype(np.float64), tensor.name) if array.dtype == np.float32 else tensor

    for i, tensor in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(widen(tensor))
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    graph.ClearField("value_info")
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(widen(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return result


# ------------------------------------------------------------------------------------------------ one custom op


def perforated_model(x_shape, w, b, mask, attrs: ops.ConvAttributes, interpolate=True, mask_dtype=bool):
    inputs = ["x", "w", "b" if b is not None else "", "mask"]
    nodes = [ops.make_perforated_conv_node(inputs, "yc", attrs, "conv")]
    initializers = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(mask.astype(mask_dtype), "mask")]
    if b is not None:
        initializers.append(numpy_helper.from_array(b, "b"))
    output = "yc"
    if interpolate:
        nodes.append(ops.make_nn_interpolate_node("yc", "index", "y", "conv/interpolate"))
        initializers.append(numpy_helper.from_array(ops.nearest_index(mask), "index"))
        output = "y"
    graph = helper.make_graph(
        nodes,
        "perforated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])


def assert_close_to_reference(y, x, w, b, mask, attrs: ops.ConvAttributes):
    """|y - ref| within float32 rounding of the sum of |terms| (the accumulation's own scale)."""
    kwargs = dict(
        kernel_shape=attrs.kernel_shape,
        strides=attrs.strides,
        pads=attrs.pads,
        dilations=attrs.dilations,
        group=attrs.group,
    )
    ref = ops.perforated_conv_reference(
        x, w, b, mask, activation=attrs.activation, alpha=attrs.alpha, clip_min=attrs.clip_min,
        clip_max=attrs.clip_max, **kwargs
    )
    scale = ops.perforated_conv_reference(np.abs(x), np.abs(w), None if b is None else np.abs(b), mask, **kwargs)
    assert y.shape == ref.shape
    assert np.isfinite(y).all()
    err = np.abs(y.astype(np.float64) - ref)
    bound = 1e-5 * scale + 1e-6
    worst = float((err / bound).max()) if err.size else 0.0
    assert worst <= 1.0, f"max error {err.max():.3g} is {worst:.2f}x the float32 rounding bound"


def ort_conv(x, w, b, attrs: ops.ConvAttributes):
    """ORT's own Conv with the same attributes: the independent oracle of the kernels."""
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], kernel_shape=list(attrs.kernel_shape), strides=list(attrs.strides),
                          pads=list(attrs.pads), dilations=list(attrs.dilations), group=attrs.group)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return run_ort(model, {"x": x}, library=False)[0]


def bad_model(nodes, inputs, initializers):
    """A model of `nodes` (standard and custom ops) with output y, for the error tests."""
    graph = helper.make_graph(nodes, "bad", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])


def expect_error(model, feeds, *fragments):
    """Running `model` (with the library) fails with a message holding every fragment."""
    with pytest.raises(Exception) as info:
        run_ort(model, feeds, threads=2)[0]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------ a small CNN


def synthetic_cnn(softmax=False, seed=0) -> onnx.ModelProto:
    """Conv->BN->Relu->MaxPool->Conv->Relu->GlobalAveragePool->Flatten->Gemm(->Softmax), x [N, 3, 12, 12].

    The second conv's weight is a Constant node, not an initializer, on purpose."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=1.0, offset=0.0):
        return numpy_helper.from_array((offset + scale * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3, scale=0.3), init("b1", 8, scale=0.1),
             init("bn_s", 8, scale=0.2, offset=1.0), init("bn_b", 8, scale=0.1),
             init("bn_m", 8, scale=0.1), init("wg", 6, 5, scale=0.5), init("bg", 5, scale=0.1)]
    bn_var = np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5
    inits.append(numpy_helper.from_array(bn_var, "bn_v"))
    w2 = (0.3 * rng.standard_normal((6, 8, 3, 3))).astype(np.float32)
    out = "probs" if softmax else "logits"
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def synthetic_input(n, seed=1) -> np.ndarray:
    """Inputs of synthetic_cnn, never zeros: a zero input makes every ReLU sit on its kink."""
    return np.random.default_rng(seed).uniform(0.1, 1.0, (n, 3, 12, 12)).astype(np.float32)


def labelled_batches(n=32, batch=16) -> list:
    """Calibration data for synthetic_cnn: (feeds, labels) pairs, labels cycling over the 5 classes."""
    x = synthetic_input(n)
    labels = np.arange(n) % 5
    return [({"x": x[i : i + batch]}, labels[i : i + batch]) for i in range(0, n, batch)]


# ------------------------------------------------------------------------------------------------ one Conv and what follows it

_RNG = np.random.default_rng(0)


def f32(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def build(nodes, initializers, *, x_shape=("N", 3, 12, 12), y_shape=None, opset=13, outputs=("y",), x_name="x"):
    """A model from nodes; output shapes are left to shape inference unless given."""
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape) for o in outputs]
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x_shape))], outs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)
    # Keep only the declared graph outputs' inferred shapes, drop value_info (like a plain export).
    inferred = {vi.name: vi for vi in model.graph.value_info}
    del model.graph.value_info[:]
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.CopyFrom(inferred[out.name])
    return model


def conv_model(*, after=(), opset=15, bias=True, pads=(1, 1, 1, 1), strides=(1, 1), channels=8, **conv_attrs):
    """x [N, 3, 12, 12] -> Conv 'conv' (3x3) -> the nodes in ``after`` (each a callable(prev) -> (nodes,
    inits, out), see bn, unary and binary) -> Identity -> y."""
    w = _RNG.normal(size=(channels, 3, 3, 3)) * 0.3
    inits = [f32("W", w)]
    inputs = ["x", "W"]
    if bias:
        inits.append(f32("B", _RNG.normal(size=channels)))
        inputs.append("B")
    attrs = dict(conv_attrs)
    if "auto_pad" not in attrs:
        attrs["pads"] = list(pads)
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", strides=list(strides), **attrs)]
    prev = "c"
    for make in after:
        more_nodes, more_inits, prev = make(prev)
        nodes += more_nodes
        inits += more_inits
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    return build(nodes, inits, opset=opset)


def bn(prev, name="bn", channels=8, **attrs):
    params = [
        f32(f"{name}_g", _RNG.uniform(0.5, 1.5, channels)),
        f32(f"{name}_b", _RNG.normal(size=channels)),
        f32(f"{name}_m", _RNG.normal(size=channels)),
        f32(f"{name}_v", _RNG.uniform(0.5, 2.0, channels)),
    ]
    node = helper.make_node("BatchNormalization", [prev] + [p.name for p in params], [name], name=name, **attrs)
    return [node], params, name


def unary(op, name=None, **attrs):
    name = name or op.lower()
    return lambda prev: ([helper.make_node(op, [prev], [name], name=name, **attrs)], [], name)


def binary(op, value, name=None, const_first=False):
    name = name or op.lower()

    def make(prev):
        inputs = [f"{name}_c", prev] if const_first else [prev, f"{name}_c"]
        return [helper.make_node(op, inputs, [name], name=name)], [f32(f"{name}_c", value)], name

    return make


def x_for(model, batch=2) -> np.ndarray:
    """A random input for the model's first input (symbolic dimensions become `batch`)."""
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return _RNG.normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------ rewriting them


def reference_is_exact(model) -> bool:
    """onnx.reference (1.23) runs BatchNormalization of opsets 7-13 in training mode (it applies the
    default momentum), so it cannot be the oracle for those."""
    opset = next(o.version for o in model.opset_import if o.domain == "")
    return opset >= 14 or all(n.op_type != "BatchNormalization" for n in model.graph.node)


def ones_for(model, key="conv"):
    (record,) = [r for r in onnx_perforate.inspect(model) if r.name == key]
    return np.ones(record.output_shape[2:], dtype=bool)


def assert_valid(model):
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)


def assert_reproduces(model, backend, **kwargs):
    """All-ones masks on conv_model's 'conv': the rewritten model (checked valid) computes on `backend`
    what the original does in plain ORT. Returns the rewritten model."""
    out = onnx_perforate.rewrite(model, {"conv": ones_for(model)}, **kwargs)
    assert_valid(out)
    x = x_for(model)
    want = run_ort(model, x, library=False)[0]
    if backend != "reference" or reference_is_exact(out):
        assert_close(run_backend(backend, out, x)[0], want)
    return out


# ------------------------------------------------------------------------------------------------ Conv networks for the compact pass

_GRAPH_RNG = np.random.default_rng(1)


class GraphBuilder:
    """A tiny graph builder: x [N, channels, hw, hw] in, outputs named at the end."""

    def __init__(self, channels=4, hw=10):
        self.nodes, self.inits, self.channels, self.hw = [], [], channels, hw

    def weight(self, name, *shape):
        scale = np.sqrt(np.prod(shape[1:]))
        self.inits.append(numpy_helper.from_array((_GRAPH_RNG.normal(size=shape) / scale).astype(np.float32), name))

    def conv(self, name, x, cin, cout, k=3, pad=None, stride=1, relu=True):
        pad = (k // 2) if pad is None else pad
        self.weight(f"{name}_w", cout, cin, k, k)
        self.inits.append(numpy_helper.from_array(_GRAPH_RNG.normal(size=cout).astype(np.float32) * 0.1, f"{name}_b"))
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
            self.nodes, "compact",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", self.channels, self.hw, self.hw])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return onnx.shape_inference.infer_shapes(model)


def fire(g: GraphBuilder, x, cin, name, squeeze=3, expand=4):
    """A SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""
    s = g.conv(f"{name}_sq", x, cin, squeeze, k=1)
    e1 = g.conv(f"{name}_e1", s, squeeze, expand, k=1)
    e3 = g.conv(f"{name}_e3", s, squeeze, expand, k=3)
    return g.op("Concat", [e1, e3], f"{name}_cat", axis=1)


def layer_masks(model, names, rate=0.5, kind="grid") -> dict:
    """Grid (or uniform) masks at `rate` for the named Convs of `model`."""
    records = {r.name: r for r in onnx_perforate.inspect(model)}
    make = masks.grid if kind == "grid" else (lambda s, r: masks.uniform(s, r, seed=3))
    return {n: make(records[n].output_shape[2:], rate) for n in names}


def chained_perforated_convs(with_1x1=False):
    """conv a (3x3) -> conv b (3x3, stride 2) [-> conv c (1x1)], a and b perforated: b reads a's
    compact output through X_index. Returns the model and its masks."""
    g = GraphBuilder()
    a = g.conv("a", "x", 4, 6)
    out = g.conv("b", a, 6, 5, stride=2)
    if with_1x1:
        out = g.conv("c", out, 5, 7, k=1)
    model = g.model([out])
    chosen = layer_masks(model, ["a"])
    chosen["b"] = masks.grid((5, 5), 0.4)
    return model, chosen


def crafted_gather_index(lanes: int, count: int = 1000) -> np.ndarray:
    """Chunks of `lanes` outputs: sources within one two-vector window, within two far apart (two
    permutes and a blend), spread over three windows (the scalar loop), within two of which the second
    overhangs the end of the compact plane (masked loads), and a partial last chunk."""
    lane = np.arange(lanes)
    one = lane // 2
    two = np.where(lane % 2 == 0, 10 + lane // 2, 600 + lane // 2)
    three = (lane % 3) * 300 + lane // 3
    overhanging = np.where(lane % 2 == 0, lane, count - 1 - lane % 3)
    tail = overhanging[:lanes // 2]
    return np.concatenate([one, two, three, overhanging, tail]).reshape(1, -1).astype(np.int64)
