"""PerforatedConv and NNInterpolate: the compiled kernels in ORT against the numpy reference (float64)
and against ORT's own Conv, on random shapes, strides, pads, dilations, groups, batches and masks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import ops

from helpers import (
    assert_close_to_reference,
    changing_index_runs,
    crafted_gather_index,
    bad_model,
    expect_error,
    needs_library,
    ort_conv,
    perforated_model,
    run_ort,
)

pytestmark = needs_library


@st.composite
def conv_cases(draw):
    group = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and group == 1
    cg = 1 if depthwise else draw(st.integers(1, 6))
    channels = draw(st.integers(1, 6)) if depthwise else cg * group
    if depthwise:
        group = channels
    m = group * draw(st.integers(1, 5 if not depthwise else 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    h = draw(st.integers(max(1, eff_h - pads[0] - pads[2]), 12))
    w = draw(st.integers(max(1, eff_w - pads[1] - pads[3]), 12))
    n = draw(st.integers(1, 3))
    activation = draw(st.sampled_from(ops.ACTIVATIONS))
    with_bias = draw(st.booleans())
    mask_kind = draw(st.sampled_from(["random", "ones", "single"]))
    seed = draw(st.integers(0, 2**31 - 1))
    attrs = ops.ConvAttributes(
        kernel_shape=(kh, kw), strides=(sh, sw), pads=pads, dilations=(dh, dw), group=group,
        activation=activation, alpha=0.2, clip_min=-0.5, clip_max=0.7,
    )
    return (n, channels, h, w, m, cg), attrs, with_bias, mask_kind, seed


def random_case(n, c, h, w, m, cg, attrs, with_bias, mask_kind, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weights = rng.standard_normal((m, cg, *attrs.kernel_shape)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if with_bias else None
    ho, wo = ops.conv_output_size((h, w), attrs.kernel_shape, attrs.strides, attrs.pads, attrs.dilations)
    if mask_kind == "ones":
        mask = np.ones((ho, wo), bool)
    elif mask_kind == "single":
        mask = np.zeros((ho, wo), bool)
        mask[rng.integers(ho), rng.integers(wo)] = True
    else:
        mask = rng.random((ho, wo)) < rng.uniform(0.2, 0.9)
        mask.flat[rng.integers(mask.size)] = True
    return x, weights, b, mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_perforated_conv_matches_reference(case):
    (n, c, h, w, m, cg), attrs, with_bias, mask_kind, seed = case
    x, weights, b, mask = random_case(n, c, h, w, m, cg, attrs, with_bias, mask_kind, seed)
    yc = run_ort(perforated_model(x.shape, weights, b, mask, attrs, interpolate=False), {"x": x}, threads=2)[0]
    assert_close_to_reference(yc, x, weights, b, mask, attrs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_interpolated_output_matches_reference(case):
    (n, c, h, w, m, cg), attrs, with_bias, mask_kind, seed = case
    x, weights, b, mask = random_case(n, c, h, w, m, cg, attrs, with_bias, mask_kind, seed)
    y = run_ort(perforated_model(x.shape, weights, b, mask, attrs), {"x": x}, threads=2)[0]
    yc = ops.perforated_conv_reference(
        x, weights, b, mask, kernel_shape=attrs.kernel_shape, strides=attrs.strides, pads=attrs.pads,
        dilations=attrs.dilations, group=attrs.group, activation=attrs.activation, alpha=attrs.alpha,
        clip_min=attrs.clip_min, clip_max=attrs.clip_max,
    )
    expected = ops.nn_interpolate_reference(yc, ops.nearest_index(mask))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


# Shapes that exercise every path of the CPU kernel: reduction split in KC slices (patch > 256), channel
# tiles of one and two vectors with tails, column blocks with position tails, depthwise, OpenBLAS groups,
# one input channel per group feeding many outputs.
LARGE_CASES = [
    ((1, 64, 20, 20), (40, 64, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1))),
    ((2, 96, 15, 17), (16, 96, 3, 3), ops.ConvAttributes((3, 3), strides=(2, 1), pads=(0, 1, 2, 1))),
    ((1, 128, 28, 28), (192, 128, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1))),
    ((3, 48, 14, 14), (48, 1, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), group=48)),
    ((1, 64, 13, 13), (128, 16, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), group=4)),
    ((2, 300, 9, 9), (33, 300, 1, 1), ops.ConvAttributes((1, 1))),
    # Weights of one pass larger than half of any L2 (SqueezeNet's conv10, 2 MB): the panels go in
    # L2-sized chunks, each serving every tile of the block before the next.
    ((1, 512, 13, 13), (1000, 512, 1, 1), ops.ConvAttributes((1, 1))),
    # One input channel, many outputs (a grey image's first layer; channel multiplier 8): the GEMM.
    ((4, 1, 28, 28), (16, 1, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1))),
    ((2, 6, 11, 11), (48, 1, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), group=6)),
    # Batches of at least two images per core (on a 2-core machine; test_batches_image_by_image sizes
    # its batch from the core count) with many positions each: the GEMM runs image by image, copying
    # the padded (or interpolated) input per image.
    ((5, 32, 24, 24), (48, 32, 3, 3), ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1))),
    ((4, 16, 26, 26), (24, 8, 3, 3), ops.ConvAttributes((3, 3), group=2)),
]


@pytest.mark.parametrize("x_shape, w_shape, attrs", LARGE_CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_all_ones_mask_equals_ort_conv(x_shape, w_shape, attrs, threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    expected = ort_conv(x, w, b, attrs)
    mask = np.ones(expected.shape[2:], bool)
    y = run_ort(perforated_model(x.shape, w, b, mask, attrs), {"x": x}, threads=threads)[0]
    scale = np.abs(ort_conv(np.abs(x), np.abs(w), np.abs(b), attrs))
    assert np.isfinite(y).all()
    assert (np.abs(y - expected) <= 1e-5 * scale + 1e-6).all()


@pytest.mark.parametrize("x_shape, w_shape, attrs", LARGE_CASES)
def test_random_mask_on_large_layers(x_shape, w_shape, attrs):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    ho, wo = ops.conv_output_size(x_shape[2:], attrs.kernel_shape, attrs.strides, attrs.pads, attrs.dilations)
    mask = rng.random((ho, wo)) < 0.4
    mask[0, 0] = True
    yc = run_ort(perforated_model(x.shape, w, b, mask, attrs, interpolate=False), {"x": x}, threads=2)[0]
    assert_close_to_reference(yc, x, w, b, mask, attrs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch, group, activation", [(1, 1, "Relu"), (2, 1, ""), (2, 2, "Clip")])
def test_few_positions_many_channels(batch, group, activation, threads):
    """Small perforated layers (few computed positions, many output channels) split their channels over
    several tasks per core: 200 channels per group are 7 panels, 6 full and one of 8 rows, in splits of
    2; fewer than 16 positions per image leave a partial block for the masked store."""
    rng = np.random.default_rng(12 + batch + group)
    x = rng.standard_normal((batch, 24 * group, 9, 9)).astype(np.float32)
    w = rng.standard_normal((200 * group, 24, 3, 3)).astype(np.float32)
    b = rng.standard_normal(200 * group).astype(np.float32)
    attrs = ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), group=group, activation=activation, clip_min=-1.0,
                               clip_max=2.0)
    mask = rng.random((9, 9)) < 0.15
    mask[4, 4] = True
    yc = run_ort(perforated_model(x.shape, w, b, mask, attrs, interpolate=False), {"x": x}, threads=threads)[0]
    assert_close_to_reference(yc, x, w, b, mask, attrs)


@pytest.mark.parametrize("threads", [1, 2])
def test_padded_rows_copied_by_the_tasks(threads):
    """A padded input is copied band by band by the GEMM's tasks, each thread into a buffer of its own,
    keeping what it already holds: bands with halos over many column blocks (dilation 2, asymmetric pads,
    blocks spanning both images of a micro-batch), a tall kernel on a second layer of another shape
    taking turns with the first on the same threads, whose second group starts again from the top rows,
    and new inputs on every run (no rows may be kept from an earlier call)."""
    rng = np.random.default_rng(31)
    layers = [  # (x shape, w shape, attributes, mask density)
        ((2, 24, 40, 37), (40, 24, 3, 3), ops.ConvAttributes((3, 3), pads=(2, 1, 0, 3), dilations=(2, 2)), 0.5),
        ((1, 16, 60, 40), (48, 8, 5, 3), ops.ConvAttributes((5, 3), strides=(1, 2), pads=(2, 1, 2, 1), group=2), 0.6),
    ]
    nodes, inputs, outputs, initializers, cases = [], [], [], [], []
    for i, (x_shape, w_shape, attrs, density) in enumerate(layers):
        ho, wo = ops.conv_output_size(x_shape[2:], attrs.kernel_shape, attrs.strides, attrs.pads, attrs.dilations)
        mask = rng.random((ho, wo)) < density
        w = rng.standard_normal(w_shape).astype(np.float32)
        b = rng.standard_normal(w_shape[0]).astype(np.float32)
        nodes.append(ops.make_perforated_conv_node([f"x{i}", f"w{i}", f"b{i}", f"mask{i}"], f"yc{i}", attrs, f"conv{i}"))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(x_shape)))
        outputs.append(helper.make_tensor_value_info(f"yc{i}", TensorProto.FLOAT, None))
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}"),
                         numpy_helper.from_array(mask, f"mask{i}")]
        cases.append((x_shape, w, b, mask, attrs))
    model = helper.make_model(helper.make_graph(nodes, "two layers", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    session = ort.InferenceSession(model.SerializeToString(), onnx_perforate.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    for _ in range(3):
        feeds = {f"x{i}": rng.standard_normal(case[0]).astype(np.float32) for i, case in enumerate(cases)}
        for i, yc in enumerate(session.run(None, feeds)):
            _, w, b, mask, attrs = cases[i]
            assert_close_to_reference(yc, feeds[f"x{i}"], w, b, mask, attrs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels, outputs", [(3, 7), (16, 64), (64, 66), (65, 8)])
def test_pointwise_on_a_row_of_positions(channels, outputs, threads):
    """1x1 convolutions over contiguous positions ([N, C, 1, K] under an all-ones mask, how the compact
    rewrite runs a 1x1 Conv on a compact tensor; a full mask on a map): up to 64 input channels they run
    with positions along the vector on AVX-512 CPUs (65 stay on the packed micro-kernel). Position counts
    around the 16-lane vectors and 96-position tiles, output channels not a multiple of the 4-row tile,
    every activation, batch 3 (several images share no tile)."""
    rng = np.random.default_rng(20 + channels)
    w = rng.standard_normal((outputs, channels, 1, 1)).astype(np.float32)
    b = rng.standard_normal(outputs).astype(np.float32)
    for k in (1, 15, 17, 95, 96, 97, 190, 300):
        for activation in ops.ACTIVATIONS:
            attrs = ops.ConvAttributes((1, 1), activation=activation, alpha=0.3, clip_min=-0.5, clip_max=0.8)
            x = rng.standard_normal((3, channels, 1, k)).astype(np.float32)
            mask = np.ones((1, k), bool)
            yc = run_ort(perforated_model(x.shape, w, b, mask, attrs, interpolate=False), {"x": x}, threads=threads)[0]
            assert_close_to_reference(yc, x, w, b, mask, attrs)
    # A 1x1 reading a compact input directly (unpadded, through X_index): contiguous when its producer
    # computed every position.
    x = rng.standard_normal((2, channels, 40)).astype(np.float32)
    mask = np.ones((5, 8), bool)
    node = ops.make_perforated_conv_node(["x", "w", "b", "mask", "x_index"], "yc", ops.ConvAttributes((1, 1)), "conv")
    graph = helper.make_graph(
        [node], "compact", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("yc", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(mask, "mask"),
         numpy_helper.from_array(ops.nearest_index(mask), "x_index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    yc = run_ort(model, {"x": x}, threads=threads)[0]
    assert_close_to_reference(yc, x.reshape(2, channels, 5, 8), w, b, mask, ops.ConvAttributes((1, 1)))
    x = rng.standard_normal((2, channels, 9, 11)).astype(np.float32)  # a full mask on a 2-D map
    attrs = ops.ConvAttributes((1, 1), activation="Relu")
    mask = np.ones((9, 11), bool)
    yc = run_ort(perforated_model(x.shape, w, b, mask, attrs, interpolate=False), {"x": x}, threads=threads)[0]
    assert_close_to_reference(yc, x, w, b, mask, attrs)


@pytest.mark.parametrize("compact", [False, True])
def test_batches_image_by_image(compact):
    """The per-image GEMM needs at least two images per core of this machine: the batch is sized from
    the core count, so that the path runs wherever the tests do (padding, group 2; a full input, and a
    compact one copied through its permute plan)."""
    rng = np.random.default_rng(30)
    batch = 2 * (os.cpu_count() or 1) + 1
    attrs = ops.ConvAttributes((3, 3), pads=(1, 0, 2, 1), group=2, activation="Relu")
    w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    h, wd = 20, 18
    ho, wo = ops.conv_output_size((h, wd), attrs.kernel_shape, attrs.strides, attrs.pads, attrs.dilations)
    mask = rng.random((ho, wo)) < 0.6
    full = rng.standard_normal((batch, 16, h, wd)).astype(np.float32)
    feeds, model = {"x": full}, perforated_model(full.shape, w, b, mask, attrs, interpolate=False)
    if compact:
        producer = rng.random((h, wd)) < 0.5
        producer[0, 0] = True
        x_index = ops.nearest_index(producer)
        x = rng.standard_normal((batch, 16, int(producer.sum()))).astype(np.float32)
        full = ops.nn_interpolate_reference(x, x_index)
        model.graph.node[0].input.append("x_index")
        model.graph.initializer.append(numpy_helper.from_array(x_index, "x_index"))
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = x.shape[2]
        del model.graph.input[0].type.tensor_type.shape.dim[3]
        feeds = {"x": x}
    for threads in (1, 2):
        yc = run_ort(model, feeds, threads=threads)[0]
        assert_close_to_reference(yc, full, w, b, mask, attrs)


def test_uint8_mask_and_missing_bias():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    attrs = ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), activation="LeakyRelu", alpha=0.1)
    mask = rng.random((9, 9)) < 0.5
    yc = run_ort(perforated_model(x.shape, w, None, mask, attrs, interpolate=False, mask_dtype=np.uint8), {"x": x}, threads=2)[0]
    assert_close_to_reference(yc, x, w, None, mask, attrs)


@pytest.mark.parametrize("gemm", ["openblas", "avx2"])
def test_other_gemm_paths_match_the_reference(gemm):
    """The OpenBLAS GEMM (CPUs without AVX2) and the AVX2 micro-kernels (CPUs without AVX-512), forced
    through ONNX_PERFORATE_GEMM, give the same results, tails and compact inputs included (copied into the
    padded input by the tasks, through the index)."""
    script = textwrap.dedent(
        """
        import numpy as np, sys
        sys.path[:0] = [{tests!r}]
        from helpers import perforated_model, run_ort, assert_close_to_reference
        from onnx import TensorProto, helper, numpy_helper
        from onnx_perforate import ops
        rng = np.random.default_rng(4)
        x = rng.standard_normal((2, 40, 11, 11)).astype(np.float32)
        w = rng.standard_normal((24, 20, 3, 3)).astype(np.float32)
        b = rng.standard_normal(24).astype(np.float32)
        mask = rng.random((11, 11)) < 0.5
        for activation in ops.ACTIVATIONS:  # each fused into the tile store's transposed write
            attrs = ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), group=2, activation=activation, alpha=0.2,
                                       clip_min=-0.5, clip_max=0.7)
            yc = run_ort(perforated_model(x.shape, w, b, mask, attrs, interpolate=False), {{"x": x}}, threads=2)[0]
            assert_close_to_reference(yc, x, w, b, mask, attrs)
        for n, k in [(1, 1), (3, 7), (2, 40), (4, 100)]:  # full, half and partial micro-tiles; image by image
            mask = np.zeros((11, 11), bool)
            mask.flat[rng.choice(121, k, replace=False)] = True
            xx = rng.standard_normal((n, 40, 11, 11)).astype(np.float32)
            yc = run_ort(perforated_model(xx.shape, w, b, mask, attrs, interpolate=False), {{"x": xx}}, threads=2)[0]
            assert_close_to_reference(yc, xx, w, b, mask, attrs)
        # a compact input, copied into the padded input through its index (no permute plan on these paths)
        producer = rng.random((11, 11)) < 0.6
        producer[5, 5] = True
        x_index = ops.nearest_index(producer)
        compact = rng.standard_normal((2, 40, int(producer.sum()))).astype(np.float32)
        model = perforated_model(x.shape, w, b, mask, attrs, interpolate=False)
        model.graph.node[0].input.append("x_index")
        model.graph.initializer.append(numpy_helper.from_array(x_index, "x_index"))
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(compact.shape)))
        for threads in (1, 2):
            yc = run_ort(model, {{"x": compact}}, threads=threads)[0]
            assert_close_to_reference(yc, ops.nn_interpolate_reference(compact, x_index), w, b, mask, attrs)
        print("ok")
        """
    ).format(tests=os.path.dirname(__file__))
    env = dict(os.environ, ONNX_PERFORATE_GEMM=gemm)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_reference_evaluator_runs_the_custom_ops():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    mask = rng.random((8, 8)) < 0.5
    mask[3, 3] = True
    model = perforated_model(x.shape, w, b, mask, ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), activation="Relu"))
    expected = ops.reference_evaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_ort(model, {"x": x}, threads=2)[0], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# nearest_index


def brute_force_index(mask):
    positions = np.argwhere(mask)
    ho, wo = mask.shape
    index = np.empty((ho, wo), np.int64)
    for i in range(ho):
        for j in range(wo):
            d = ((positions - [i, j]) ** 2).sum(axis=1)
            index[i, j] = int(np.flatnonzero(d == d.min())[0])  # argwhere is row-major: first = smallest
    return index


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_nearest_index_matches_brute_force(ho, wo, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((ho, wo)) < density
    mask.flat[rng.integers(mask.size)] = True
    index = ops.nearest_index(mask)
    np.testing.assert_array_equal(index, brute_force_index(mask))
    computed = np.flatnonzero(mask.ravel())
    assert (index.ravel()[computed] == np.arange(len(computed))).all()  # computed positions map to themselves


def test_nearest_index_ties_go_to_smallest_row_major_index():
    mask = np.zeros((3, 3), bool)
    mask[0, 1] = mask[1, 0] = mask[2, 1] = mask[1, 2] = True
    # The centre is at distance 1 from all four; (0, 1) has the smallest row-major index (k = 0).
    assert ops.nearest_index(mask)[1, 1] == 0


@pytest.mark.parametrize("kind, shape", [("random", (5, 7)), ("random", (30, 33)), ("grid", (55, 55)),
                                         ("far rows", (40, 40)), ("single", (13, 13)), ("random", (96, 96))])
def test_nn_interpolate_float_matches_the_reference(kind, shape):
    """Float gathers against numpy: chunks of 16 outputs whose sources fit 32 floats (vector permutes on
    AVX-512, masked where the window overhangs the compact plane) and wider ones (scalar), random, grid and
    far-apart sources, compact planes shorter than a SIMD vector, one and two threads; blocks of several
    planes and, for 96x96 maps (over 32 KiB a plane), one plane per block."""
    rng = np.random.default_rng(len(kind) + shape[0])
    mask = np.zeros(shape, bool)
    if kind == "random":
        mask = rng.random(shape) < 0.4
    elif kind == "grid":
        mask[::2, ::2] = True
    elif kind == "far rows":  # 16 consecutive outputs of a middle row read rows 0 and H-1, far apart
        mask[0], mask[-1] = True, True
    mask[0, 0] = True
    index = ops.nearest_index(mask)
    yc = rng.standard_normal((2, 3, int(mask.sum()))).astype(np.float32)
    graph = helper.make_graph([ops.make_nn_interpolate_node("yc", "index", "y", "interpolate")], "interpolate",
                              [helper.make_tensor_value_info("yc", TensorProto.FLOAT, list(yc.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(index, "index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    for threads in (1, 2):
        np.testing.assert_array_equal(run_ort(model, {"yc": yc}, threads=threads)[0],
                                      ops.nn_interpolate_reference(yc, index))


def test_nn_interpolate_float_one_two_and_three_source_windows():
    index = crafted_gather_index(16)
    yc = np.random.default_rng(5).standard_normal((2, 3, 1000)).astype(np.float32)
    graph = helper.make_graph([ops.make_nn_interpolate_node("yc", "index", "y", "interpolate")], "interpolate",
                              [helper.make_tensor_value_info("yc", TensorProto.FLOAT, list(yc.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(index, "index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    np.testing.assert_array_equal(run_ort(model, {"yc": yc})[0], ops.nn_interpolate_reference(yc, index))


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ORT error naming the op, the node and what was expected, never a crash.


def conv_node(**overrides):
    attrs = ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1))
    return ops.make_perforated_conv_node(["x", "w", "", "mask"], "y", attrs, "conv7")


def conv_inputs(x_shape=(1, 4, 6, 6), w_shape=(5, 4, 3, 3), mask=None):
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    w = np.ones(w_shape, np.float32)
    mask = np.ones((6, 6), bool) if mask is None else mask
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(mask, "mask")]
    return x, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], inits


def test_error_wrong_mask_shape():
    x, inputs, inits = conv_inputs(mask=np.ones((5, 6), bool))
    expect_error(bad_model([conv_node()], inputs, inits), {"x": x}, "PerforatedConv node 'conv7'", "mask",
                 "[5, 6]", "[6, 6]")


def test_error_empty_mask():
    x, inputs, inits = conv_inputs(mask=np.zeros((6, 6), bool))
    expect_error(bad_model([conv_node()], inputs, inits), {"x": x}, "conv7", "K = 0")


def test_error_channel_mismatch():
    x, inputs, inits = conv_inputs(w_shape=(5, 3, 3, 3))
    expect_error(bad_model([conv_node()], inputs, inits), {"x": x}, "conv7", "input W", "C/group = 4")


def test_error_not_4d():
    x, inputs, inits = conv_inputs()
    expect_error(bad_model([conv_node()], inputs, inits), {"x": x[0]}, "conv7", "input X", "4-D")


def test_error_index_out_of_range():
    yc = np.ones((1, 2, 3), np.float32)
    index = np.array([[0, 1], [2, 3]], np.int64)
    node = ops.make_nn_interpolate_node("yc", "index", "y", "interp3")
    model = bad_model([node], [helper.make_tensor_value_info("yc", TensorProto.FLOAT, None)],
                      [numpy_helper.from_array(index, "index")])
    expect_error(model, {"yc": yc}, "NNInterpolate node 'interp3'", "value 3", "K = 3")


def test_error_yc_not_3d():
    index = np.zeros((2, 2), np.int64)
    node = ops.make_nn_interpolate_node("yc", "index", "y", "interp4")
    model = bad_model([node], [helper.make_tensor_value_info("yc", TensorProto.FLOAT, None)],
                      [numpy_helper.from_array(index, "index")])
    expect_error(model, {"yc": np.ones((2, 3), np.float32)}, "interp4", "3-D")


def test_error_unknown_activation():
    x, inputs, inits = conv_inputs()
    node = conv_node()
    node.attribute.append(helper.make_attribute("activation", "Gelu"))
    expect_error(bad_model([node], inputs, inits), {"x": x}, "activation", "Gelu")


def test_library_does_not_link_onnxruntime():
    """The library initialises through the OrtApiBase ORT passes in, so it loads in any ORT >= 1.21."""
    path = onnx_perforate.library_path()
    result = subprocess.run(["ldd", path], capture_output=True, text=True)
    assert result.returncode == 0 and "=>" in result.stdout, result.stderr  # ldd listed the dependencies
    assert "onnxruntime" not in result.stdout


# ------------------------------------------------------------------------------------------------
# Implicit interpolation: a compact X read through X_index equals NNInterpolate followed by the conv.


@pytest.mark.parametrize("x_shape, w_shape, attrs", LARGE_CASES + [
    ((2, 6, 7, 9), (4, 6, 3, 3), ops.ConvAttributes((3, 3), strides=(2, 2), pads=(0, 1, 1, 2), dilations=(1, 2))),
    ((3, 40, 8, 10), (24, 40, 1, 1), ops.ConvAttributes((1, 1), strides=(2, 1))),  # reads the compact plane
])
@pytest.mark.parametrize("producer_rate", [0.0, 0.6])
def test_compact_input_equals_explicit_interpolation(x_shape, w_shape, attrs, producer_rate):
    rng = np.random.default_rng(6)
    n, c, h, w = x_shape
    producer_mask = rng.random((h, w)) >= producer_rate
    producer_mask[h // 2, w // 2] = True
    x_index = ops.nearest_index(producer_mask)
    compact = rng.standard_normal((n, c, int(producer_mask.sum()))).astype(np.float32)
    weights = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    ho, wo = ops.conv_output_size((h, w), attrs.kernel_shape, attrs.strides, attrs.pads, attrs.dilations)
    mask = rng.random((ho, wo)) < 0.5
    mask[0, 0] = True

    node = ops.make_perforated_conv_node(["x", "w", "b", "mask", "x_index"], "yc", attrs, "conv")
    graph = helper.make_graph(
        [node], "compact", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(compact.shape))],
        [helper.make_tensor_value_info("yc", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(x_index, "x_index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    got = run_ort(model, {"x": compact}, threads=2)[0]
    explicit = run_ort(perforated_model(x_shape, weights, b, mask, attrs, interpolate=False),
                       {"x": ops.nn_interpolate_reference(compact, x_index)}, threads=2)[0]
    np.testing.assert_array_equal(got, explicit)  # same arithmetic, same order: bit-identical
    np.testing.assert_allclose(ops.reference_evaluator(model).run(None, {"x": compact})[0], got, rtol=1e-4, atol=1e-3)


def test_error_compact_index_out_of_range():
    x_index = np.array([[0, 1], [2, 5]], np.int64)
    node = ops.make_perforated_conv_node(["x", "w", "", "mask", "x_index"], "y",
                                         ops.ConvAttributes((1, 1)), "conv9")
    model = bad_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                      [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w"),
                       numpy_helper.from_array(np.ones((2, 2), bool), "mask"),
                       numpy_helper.from_array(x_index, "x_index")])
    expect_error(model, {"x": np.ones((1, 3, 4), np.float32)}, "conv9", "X_index", "value 5", "K_in = 4")
    expect_error(model, {"x": np.ones((1, 3, 2, 2), np.float32)}, "conv9", "3-D")


# ------------------------------------------------------------------------------------------------
# Attributes: the default only when an attribute is absent; a wrongly typed one is an error.


@pytest.mark.parametrize("name, value, expected", [
    ("group", 1.0, "expected int"),
    ("group", "1", "expected int"),
    ("group", [1], "expected int"),
    ("pads", [1.0, 1.0, 1.0, 1.0], "expected ints"),
    ("pads", 1, "expected ints"),
    ("activation", 1, "expected string"),
    ("alpha", 1, "expected float"),
    ("strides", numpy_helper.from_array(np.array([1, 1], np.int64)), "expected ints"),
])
def test_error_wrongly_typed_attribute(name, value, expected):
    x, inputs, inits = conv_inputs()
    node = conv_node()
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    with pytest.raises(Exception) as info:  # when ORT creates the kernel, i.e. with the session
        ort.InferenceSession(bad_model([node], inputs, inits).SerializeToString(), onnx_perforate.session_options(1),
                             providers=["CPUExecutionProvider"])
    message = str(info.value)
    assert "PerforatedConv node 'conv7'" in message and f"attribute '{name}'" in message and expected in message, message


def test_absent_attributes_take_their_defaults():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    mask = rng.random((4, 4)) < 0.6
    mask[0, 0] = True
    node = helper.make_node("PerforatedConv", ["x", "w", "", "mask"], ["y"], name="bare", domain=ops.DOMAIN)
    model = bad_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                      [numpy_helper.from_array(w, "w"), numpy_helper.from_array(mask, "mask")])
    assert_close_to_reference(run_ort(model, {"x": x}, threads=2)[0], x, w, None, mask, ops.ConvAttributes((3, 3)))


# ------------------------------------------------------------------------------------------------
# Each kernel caches what it derives from the mask and the indices; inputs that are not initializers
# may change between runs of one session, and the results must follow them.


def test_non_constant_mask_and_index_follow_every_run():
    rng = np.random.default_rng(12)
    attrs = ops.ConvAttributes((3, 3), pads=(1, 1, 1, 1), activation="Relu")
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    nodes = [ops.make_perforated_conv_node(["x", "w", "b", "mask", "x_index"], "yc", attrs, "conv"),
             ops.make_nn_interpolate_node("yc", "index", "y", "conv/interpolate")]
    session, runs = changing_index_runs(nodes, TensorProto.FLOAT, [numpy_helper.from_array(w, "w"),
                                                                   numpy_helper.from_array(b, "b")], 7, 30)
    for producer, mask in runs:
        x_index = ops.nearest_index(producer)
        compact = rng.standard_normal((2, 6, int(producer.sum()))).astype(np.float32)
        feeds = {"x": compact, "mask": mask.copy(), "x_index": x_index.copy(), "index": ops.nearest_index(mask)}
        y = session.run(None, feeds)[0]
        yc = ops.perforated_conv_reference(ops.nn_interpolate_reference(compact, x_index), w, b, mask,
                                           kernel_shape=(3, 3), pads=(1, 1, 1, 1), activation="Relu")
        expected = ops.nn_interpolate_reference(yc, ops.nearest_index(mask))
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
