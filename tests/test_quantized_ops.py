"""PerforatedQLinearConv: the compiled kernel in ORT against ORT's own QLinearConv (all-ones masks) and
against the numpy reference (any mask, compact inputs), bit for bit, on every micro-kernel the CPU has;
NNInterpolate on uint8; bad quantization inputs get errors naming the node."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import ORT_EXACT_WEIGHT_MAX, changing_index_runs, crafted_gather_index, expect_error, run_ort
from onnx_perforate import ops

pytestmark = pytest.mark.usefixtures("require_library")

QLINEAR_INPUTS = ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point"]


def quantized_case(rng, n, c, h, w, m, k, stride=1, pad=0, dilation=1, group=1, per_channel=True, bias=True,
                   weight_max=127):
    """Random uint8 input, symmetric int8 weights in [-weight_max, weight_max] and scales that keep most
    outputs unsaturated."""
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    weights = rng.integers(-weight_max, weight_max + 1, (m, c // group, k, k), dtype=np.int8)
    patch = c // group * k * k
    params = {
        "x_scale": np.float32(rng.uniform(0.01, 0.05)),
        "x_zero_point": np.uint8(rng.integers(0, 256)),
        "w": weights,
        "w_scale": rng.uniform(0.001, 0.01, m if per_channel else 1).astype(np.float32),
        "w_zero_point": np.zeros(m if per_channel else 1, np.int8),
        "y_zero_point": np.uint8(rng.integers(64, 192)),
    }
    if not per_channel:
        params["w_scale"], params["w_zero_point"] = np.float32(params["w_scale"][0]), np.int8(0)
    # Output scale from the typical size of a sum of `patch` products.
    typical_product = 180 * weight_max / 127
    params["y_scale"] = np.float32(params["x_scale"] * np.max(params["w_scale"]) * typical_product * np.sqrt(patch))
    if bias:
        params["B"] = rng.integers(-3000, 3000, m).astype(np.int32)
    attrs = ops.ConvAttributes(kernel_shape=(k, k), strides=(stride, stride), pads=(pad,) * 4,
                               dilations=(dilation, dilation), group=group)
    return x, params, attrs


def model_of(nodes, x, params, extra=(), output="y"):
    initializers = [numpy_helper.from_array(np.asarray(v), name) for name, v in params.items()]
    initializers += [numpy_helper.from_array(np.asarray(v), name) for name, v in extra]
    x_type = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}.get(x.dtype, TensorProto.FLOAT)
    graph = helper.make_graph(
        nodes, "quantized", [helper.make_tensor_value_info("x", x_type, list(x.shape))],
        [helper.make_tensor_value_info(output, TensorProto.INT8 if x.dtype == np.int8 else TensorProto.UINT8, None)],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])


def qlinear_conv_model(x, params, attrs):
    inputs = QLINEAR_INPUTS + (["B"] if "B" in params else [])
    attributes = {k: v for k, v in attrs.to_onnx().items()}
    return model_of([helper.make_node("QLinearConv", inputs, ["y"], name="qconv", **attributes)], x, params)


def perforated_model(x, params, attrs, mask, x_index=None, interpolate=False, name="pconv"):
    inputs = QLINEAR_INPUTS + ["B" if "B" in params else "", "mask"] + (["x_index"] if x_index is not None else [])
    nodes = [ops.make_perforated_qlinear_conv_node(inputs, "yc", attrs, name)]
    extra = [("mask", mask)] + ([("x_index", x_index)] if x_index is not None else [])
    if interpolate:
        nodes.append(ops.make_nn_interpolate_node("yc", "index", "y", f"{name}/interpolate"))
        extra.append(("index", ops.nearest_index(mask)))
    return model_of(nodes, x, params, extra, output="y" if interpolate else "yc")


def run(model, x, threads=2):
    return run_ort(model, {"x": x}, threads=threads)[0]


def reference(x, params, attrs, mask, x_index=None):
    args = [params[name] for name in QLINEAR_INPUTS[1:3]]
    return ops.perforated_qlinear_conv_reference(
        x, *args, params["w"], params["w_scale"], params["w_zero_point"], params["y_scale"], params["y_zero_point"],
        params.get("B"), mask, strides=attrs.strides, pads=attrs.pads, dilations=attrs.dilations, group=attrs.group,
        activation=attrs.activation, clip_min=attrs.clip_min, clip_max=attrs.clip_max, x_index=x_index)


# (n, c, h, w, m, k, stride, pad, dilation, group, per_channel, bias)
CASES = [
    (1, 16, 10, 10, 32, 3, 1, 1, 1, 1, True, True),
    (2, 13, 9, 11, 40, 3, 2, 1, 1, 1, True, True),  # channels not a multiple of 4, batch 2, stride 2
    (1, 8, 12, 12, 8, 3, 1, 2, 2, 8, True, False),  # depthwise, dilation 2, no bias
    (1, 32, 7, 7, 64, 1, 1, 0, 1, 1, False, True),  # 1x1, per-tensor weights
    (1, 12, 9, 9, 24, 3, 1, 1, 1, 3, True, True),  # groups
    (1, 64, 14, 14, 96, 3, 1, 1, 1, 1, True, True),  # several panels of 32 channels
    (1, 5, 9, 8, 7, 5, 1, 2, 1, 1, True, True),  # 5x5, odd channel counts
    (1, 48, 20, 18, 48, 3, 1, 1, 1, 1, True, True),  # whole 16x16 byte transposes and their edges
    (2, 32, 17, 17, 40, 3, 1, 1, 1, 1, True, True),  # transposed runs that end at an image boundary
    (1, 3, 20, 19, 16, 3, 2, 1, 1, 1, True, True),  # RGB: 3 channels interleaved into 4-byte pixels
    (2, 32, 13, 13, 48, 3, 1, 1, 1, 1, True, True),  # rows narrower than 16: whole planes transposed, then padded
    (2, 64, 13, 13, 16, 1, 1, 0, 1, 1, True, True),  # 1x1 without padding: planes transposed into the buffer
]


@pytest.mark.parametrize("case", CASES)
def test_all_ones_mask_matches_ort_qlinear_conv_bit_for_bit(case):
    rng = np.random.default_rng(sum(case))
    x, params, attrs = quantized_case(rng, *case, weight_max=ORT_EXACT_WEIGHT_MAX)
    expected = run(qlinear_conv_model(x, params, attrs), x)
    mask = np.ones(expected.shape[2:], bool)
    got = run(perforated_model(x, params, attrs, mask), x)
    assert got.shape == (expected.shape[0], expected.shape[1], mask.size)
    saturated = np.mean((expected == 0) | (expected == 255))
    assert saturated < 0.5, "the case should exercise the requantization, not the clamp"
    np.testing.assert_array_equal(got, expected.reshape(got.shape))
    np.testing.assert_array_equal(reference(x, params, attrs, mask), got)


@pytest.mark.parametrize("case", CASES[:5] + CASES[-2:])
def test_perforated_matches_reference_and_interpolates_uint8(case):
    rng = np.random.default_rng(100 + sum(case))
    x, params, attrs = quantized_case(rng, *case)
    ho, wo = ops.conv_output_size(x.shape[2:], attrs.kernel_shape, attrs.strides, attrs.pads, attrs.dilations)
    mask = rng.random((ho, wo)) < 0.5
    mask[ho // 2, wo // 2] = True
    compact = reference(x, params, attrs, mask)
    np.testing.assert_array_equal(run(perforated_model(x, params, attrs, mask), x), compact)
    full = run(perforated_model(x, params, attrs, mask, interpolate=True), x)
    assert full.dtype == np.uint8
    np.testing.assert_array_equal(full, ops.nn_interpolate_reference(compact, ops.nearest_index(mask)))


@pytest.mark.parametrize("m", [16, 64])  # one and two vectors of output channels per micro-kernel row block
def test_every_tile_width_matches_the_reference(m):
    """1 to 25 computed positions: every partial last tile of the micro-kernels (12 columns with VNNI, 6 with
    AVX2) runs its own exact-width kernel."""
    rng = np.random.default_rng(m)
    x, params, attrs = quantized_case(rng, 1, 24, 7, 7, m, 3, pad=1)
    for count in range(1, 26):
        mask = np.zeros(49, bool)
        mask[rng.choice(49, count, replace=False)] = True
        mask = mask.reshape(7, 7)
        np.testing.assert_array_equal(run(perforated_model(x, params, attrs, mask), x),
                                      reference(x, params, attrs, mask), err_msg=f"{count} positions")


# (n, c, h, w, m): pointwise convolutions run channel-major (positions along the vector): 1 to 3 vectors of
# positions per tile, partial vectors, several tiles of 48, channel counts off the 4-lane quads and the
# 8-row blocks, batch 2.
POINTWISE = [(1, 16, 1, 5, 8), (2, 5, 7, 7, 13), (1, 64, 13, 13, 40), (2, 24, 3, 11, 16), (1, 128, 9, 12, 48),
             (2, 20, 9, 11, 100)]  # the last: 8-row blocks at every offset of 32-row weight panels


@pytest.mark.parametrize("case", POINTWISE)
@pytest.mark.parametrize("activation", ["", "Relu", "Clip"])
def test_pointwise_matches_qlinear_conv_and_the_reference(case, activation):
    n, c, h, w, m = case
    rng = np.random.default_rng(sum(case) + len(activation))
    x, params, attrs = quantized_case(rng, n, c, h, w, m, 1, weight_max=ORT_EXACT_WEIGHT_MAX)
    attrs.activation = activation
    attrs.clip_min, attrs.clip_max = (-0.5, 2.0) if activation == "Clip" else (attrs.clip_min, attrs.clip_max)
    ones = np.ones((h, w), bool)
    got = run(perforated_model(x, params, attrs, ones), x)
    if not activation:  # QLinearConv has no fused activation
        np.testing.assert_array_equal(got, run(qlinear_conv_model(x, params, attrs), x).reshape(got.shape))
    np.testing.assert_array_equal(got, reference(x, params, attrs, ones))
    mask = rng.random((h, w)) < 0.5  # computed positions gathered from the full input
    mask[0, -1] = True
    np.testing.assert_array_equal(run(perforated_model(x, params, attrs, mask), x), reference(x, params, attrs, mask))
    signed_x, signed_params = as_int8(x, params)
    np.testing.assert_array_equal(run(perforated_model(signed_x, signed_params, attrs, mask), signed_x),
                                  reference(signed_x, signed_params, attrs, mask))


def interpolation_mask(kind, shape, rng):
    mask = np.zeros(shape, bool)
    if kind == "random":
        mask = rng.random(shape) < 0.4
    elif kind == "far rows":  # rows 0 and H-1: 64 consecutive outputs can read sources > 128 bytes apart
        mask[0], mask[-1] = True, True
    mask[0, 0] = True
    return mask


@pytest.mark.parametrize("kind, shape", [("random", (5, 7)), ("random", (30, 33)), ("far rows", (70, 70)),
                                         ("random", (260, 260)),  # over 64 KiB a plane: one plane per block
                                         ("single", (13, 13))])
def test_nn_interpolate_uint8_matches_the_reference(kind, shape):
    """Byte gathers: chunks of 64 outputs whose sources fit 128 bytes (vector permutes on AVX-512 VBMI) and
    wider ones (scalar), partial last chunks and compact planes shorter than a vector."""
    rng = np.random.default_rng(len(kind) + shape[0])
    mask = interpolation_mask(kind, shape, rng)
    index = ops.nearest_index(mask)
    yc = rng.integers(0, 256, (2, 3, int(mask.sum())), dtype=np.uint8)
    model = model_of([ops.make_nn_interpolate_node("x", "index", "y", "interpolate")], yc, {}, [("index", index)])
    np.testing.assert_array_equal(run(model, yc), ops.nn_interpolate_reference(yc, index))


def test_nn_interpolate_uint8_one_two_and_three_source_windows():
    index = crafted_gather_index(64)
    yc = np.random.default_rng(6).integers(0, 256, (2, 3, 1000), dtype=np.uint8)
    model = model_of([ops.make_nn_interpolate_node("x", "index", "y", "interpolate")], yc, {}, [("index", index)])
    np.testing.assert_array_equal(run(model, yc), ops.nn_interpolate_reference(yc, index))


@pytest.mark.parametrize("n, c, h, w", [(2, 24, 11, 9), (1, 32, 18, 20), (2, 32, 13, 13)])  # whole 16x16 transposes; narrow rows
def test_compact_input_through_x_index(n, c, h, w):
    rng = np.random.default_rng(7)
    x, params, attrs = quantized_case(rng, n, c, h, w, 32, 3, pad=1)
    producer = rng.random((h, w)) < 0.4
    producer[0, 0] = True
    index = ops.nearest_index(producer)
    compact_x = x.reshape(n, c, -1)[:, :, np.flatnonzero(producer)]
    mask = rng.random((h, w)) < 0.6
    mask[5, 5] = True
    got = run(perforated_model(compact_x, params, attrs, mask, x_index=index), compact_x)
    np.testing.assert_array_equal(got, reference(ops.nn_interpolate_reference(compact_x, index), params, attrs, mask))


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_fused_activation_is_a_clamp_of_the_quantized_output(activation):
    rng = np.random.default_rng(11)
    x, params, attrs = quantized_case(rng, 1, 16, 8, 8, 16, 3, pad=1)
    attrs.activation = activation
    attrs.clip_min, attrs.clip_max = (-0.5, 2.0) if activation == "Clip" else (attrs.clip_min, attrs.clip_max)
    mask = np.ones((8, 8), bool)
    got = run(perforated_model(x, params, attrs, mask), x)
    np.testing.assert_array_equal(got, reference(x, params, attrs, mask))
    plain = attrs.__class__(**{**attrs.__dict__, "activation": ""})
    lo, hi = ops.quantized_activation_bounds(activation, params["y_scale"], int(params["y_zero_point"]),
                                             attrs.clip_min, attrs.clip_max)
    np.testing.assert_array_equal(got, np.clip(reference(x, params, attrs=plain, mask=mask), lo, hi))
    assert (got == lo).any(), "the activation should clamp some outputs"


def as_int8(x, params):
    """The same case with int8 activations (S8S8): x - 128 and the activation zero points - 128."""
    def signed(v):
        return (np.asarray(v).astype(np.int16) - 128).astype(np.int8)

    return signed(x), dict(params, x_zero_point=signed(params["x_zero_point"]), y_zero_point=signed(params["y_zero_point"]))


@pytest.mark.parametrize("case", [(1, 16, 10, 10, 32, 3, 1, 1, 1, 1), (2, 13, 9, 11, 40, 3, 2, 1, 1, 1),
                                  (1, 12, 9, 9, 24, 3, 1, 1, 1, 3), (1, 3, 20, 19, 16, 3, 2, 1, 1, 1)])
@pytest.mark.parametrize("activation", ["", "Relu", "Clip"])
def test_int8_activations(case, activation):
    """int8 input and output (S8S8): the all-ones mask matches ORT's QLinearConv bit for bit, any mask the
    reference (also through X_index and the int8 NNInterpolate), fused activations included."""
    n, c, h, w, m, k, stride, pad, dilation, group = case
    rng = np.random.default_rng(sum(case) + len(activation))
    x, params, attrs = quantized_case(rng, n, c, h, w, m, k, stride, pad, dilation, group)
    x, params = as_int8(x, params)
    attrs.activation = activation
    attrs.clip_min, attrs.clip_max = (-0.5, 2.0) if activation == "Clip" else (attrs.clip_min, attrs.clip_max)
    ones = np.ones(ops.conv_output_size((h, w), (k, k), (stride,) * 2, (pad,) * 4, (dilation,) * 2), bool)
    got = run(perforated_model(x, params, attrs, ones, interpolate=True), x)
    assert got.dtype == np.int8
    if not activation:  # QLinearConv has no fused activation
        np.testing.assert_array_equal(got, run(qlinear_conv_model(x, params, attrs), x))
    np.testing.assert_array_equal(got.reshape(n, m, -1), reference(x, params, attrs, ones))
    mask = rng.random(ones.shape) < 0.6
    mask[0, 0] = True
    producer = rng.random((h, w)) < 0.5
    producer[0, 0] = True
    index = ops.nearest_index(producer)
    compact = x.reshape(n, c, -1)[:, :, np.flatnonzero(producer)].copy()
    got = run(perforated_model(compact, params, attrs, mask, x_index=index, interpolate=True), compact)
    expected = reference(ops.nn_interpolate_reference(compact, index), params, attrs, mask)
    np.testing.assert_array_equal(got, ops.nn_interpolate_reference(expected, ops.nearest_index(mask)))


@pytest.mark.parametrize("case", [(1, 16, 10, 10, 32, 3, 1, 1, 1, 1), (2, 13, 9, 11, 40, 3, 2, 1, 1, 1),
                                  (1, 12, 9, 9, 24, 3, 1, 1, 1, 3), (1, 3, 20, 19, 16, 3, 2, 1, 1, 1)])
def test_asymmetric_weights(case):
    """Nonzero weight zero points: per tensor and per channel, the all-ones mask matches ORT's
    QLinearConv bit for bit, and any mask matches the reference (groups, stride 2, a compact input)."""
    n, c, h, w, m, k, stride, pad, dilation, group = case
    rng = np.random.default_rng(sum(case))
    x, params, attrs = quantized_case(rng, n, c, h, w, m, k, stride, pad, dilation, group,
                                      weight_max=ORT_EXACT_WEIGHT_MAX)
    per_tensor = dict(params, w_zero_point=np.int8(-37), w_scale=np.float32(params["w_scale"][0]))
    varying = dict(params, w_zero_point=rng.integers(-100, 100, m).astype(np.int8))
    ones = np.ones(ops.conv_output_size((h, w), (k, k), (stride,) * 2, (pad,) * 4, (dilation,) * 2), bool)
    for asymmetric in (per_tensor, varying):
        got = run(perforated_model(x, asymmetric, attrs, ones, interpolate=True), x)
        np.testing.assert_array_equal(got, run(qlinear_conv_model(x, asymmetric, attrs), x))
    assert not np.array_equal(got, run(qlinear_conv_model(x, params, attrs), x)), "the zero points should matter"
    mask = rng.random(ones.shape) < 0.6
    mask[0, 0] = True
    np.testing.assert_array_equal(run(perforated_model(x, varying, attrs, mask), x), reference(x, varying, attrs, mask))
    producer = rng.random((h, w)) < 0.5
    producer[0, 0] = True
    index = ops.nearest_index(producer)
    compact = x.reshape(n, c, -1)[:, :, np.flatnonzero(producer)].copy()
    np.testing.assert_array_equal(run(perforated_model(compact, varying, attrs, mask, x_index=index), compact),
                                  reference(ops.nn_interpolate_reference(compact, index), varying, attrs, mask))


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_a_3d_input_without_x_index_is_one_row(activations):
    """x [N, C, K] without X_index is [N, C, 1, K] (a compact tensor read by a 1x1 conv with an all-ones
    [1, K] mask, as the compact pass writes it): the same as the 4-D form, and as the reference."""
    rng = np.random.default_rng(11)
    x, params, attrs = quantized_case(rng, 2, 48, 1, 91, 40, 1)
    if activations == "int8":
        x, params = as_int8(x, params)
    mask = np.ones((1, 91), bool)
    rows = x.reshape(2, 48, 91)
    got = run(perforated_model(rows, params, attrs, mask), rows)
    np.testing.assert_array_equal(got, run(perforated_model(x, params, attrs, mask), x))
    np.testing.assert_array_equal(got, reference(rows, params, attrs, mask))
    # A row against a mask of another shape is refused, naming the node.
    expect_error(perforated_model(rows, params, attrs, np.ones((2, 91), bool), name="row_conv"), rows,
                 "row_conv", "mask")


@pytest.mark.skipif(os.environ.get("ONNX_PERFORATE_GEMM") is not None, reason="already forcing a micro-kernel")
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_slower_micro_kernels_match_too(isa):
    """The ISA is chosen once per process: rerun the bit-exact tests in a child forcing the other paths."""
    env = dict(os.environ, ONNX_PERFORATE_GEMM=isa)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "bit_for_bit or reference_and or tile_width or pointwise or x_index or nn_interpolate_uint8 or asymmetric or int8_activations"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_bad_quantization_inputs_name_the_node():
    rng = np.random.default_rng(3)
    x, params, attrs = quantized_case(rng, 1, 8, 6, 6, 16, 3, pad=1)
    mask = np.ones((6, 6), bool)
    wrong_scales = dict(params, w_scale=np.full(5, 0.01, np.float32))
    expect_error(perforated_model(x, wrong_scales, attrs, mask, name="conv8"), x,
                 "node 'conv8'", "w_scale", "16")
    per_channel_x = dict(params, x_zero_point=np.full(8, 3, np.uint8))
    expect_error(perforated_model(x, per_channel_x, attrs, mask, name="conv9"), x,
                 "node 'conv9'", "x_zero_point", "scalar")
    negative = dict(params, y_scale=np.float32(-1))
    expect_error(perforated_model(x, negative, attrs, mask, name="conv10"), x, "node 'conv10'", "y_scale")
    expect_error(perforated_model(x, params, attrs, np.ones((5, 6), bool), name="conv11"), x,
                 "node 'conv11'", "mask")
    int8_x = dict(params, x_zero_point=np.int8(0))
    expect_error(perforated_model(x, int8_x, attrs, mask, name="conv12"), x, "conv12")
    with pytest.raises(ValueError, match="LeakyRelu"):
        ops.make_perforated_qlinear_conv_node(["x"], "y", ops.ConvAttributes((3, 3), activation="LeakyRelu"), "n")


@pytest.mark.parametrize("dtype,axis", [(np.int8, 0), (np.uint8, 1), (np.int8, None)])
def test_quantize_linear_rounds_and_saturates_as_onnx_runtime(dtype, axis):
    """ops.quantize_linear (what the rewriter folds a QuantizeLinear of constants with): exact halves
    round to even, values beyond the type saturate, per tensor and per axis, as ORT's QuantizeLinear."""
    rng = np.random.default_rng(11)
    shape = (4, 5, 3, 3)
    scale = np.float32(2.0 ** -6) if axis is None else (2.0 ** -rng.integers(4, 8, shape[axis])).astype(np.float32)
    zero = np.asarray(3 if axis is None else rng.integers(-5, 5, shape[axis]) + (128 if dtype == np.uint8 else 0),
                      dtype)
    broadcast = () if axis is None else tuple(shape[axis] if i == axis else 1 for i in range(4))
    halves = rng.integers(-600, 600, shape) / 2  # every other value is a tie, some far beyond the type
    x = (halves * np.reshape(scale, broadcast)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["y"], **({} if axis is None else {"axis": axis}))]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)],
                              [numpy_helper.from_array(np.asarray(scale), "scale"), numpy_helper.from_array(zero, "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    expected = run_ort(model, {"x": x}, library=False)[0]
    got = ops.quantize_linear(x, scale, zero, 1 if axis is None else axis)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    info = np.iinfo(dtype)
    assert (got == info.min).any() and (got == info.max).any(), "the case should saturate"
    inside = (got != info.min) & (got != info.max)
    centred = got.astype(int) - np.broadcast_to(zero.reshape(broadcast), shape).astype(int)
    assert (halves[inside] % 1 != 0).any(), "the case should hold exact halves"
    np.testing.assert_array_equal(centred[inside], np.rint(halves[inside]))  # halves to even


def test_non_constant_mask_and_indices_follow_every_run():
    """The byte-permute plans (NNInterpolate's, and the compact input's of PerforatedQLinearConv) are
    built once per index: with the mask, X_index and index fed as graph inputs that change between runs
    of one session (144 positions: three 64-byte chunks), every run still matches the reference."""
    rng = np.random.default_rng(13)
    x, params, attrs = quantized_case(rng, 2, 8, 12, 12, 16, 3, pad=1)
    inputs = QLINEAR_INPUTS + ["B", "mask", "x_index"]
    nodes = [ops.make_perforated_qlinear_conv_node(inputs, "yc", attrs, "qconv"),
             ops.make_nn_interpolate_node("yc", "index", "y", "qconv/interpolate")]
    session, runs = changing_index_runs(nodes, TensorProto.UINT8,
                                        [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()], 12, 80)
    for producer, mask in runs:
        x_index, index = ops.nearest_index(producer), ops.nearest_index(mask)
        compact = x.reshape(2, 8, -1)[:, :, np.flatnonzero(producer)].copy()
        y = session.run(None, {"x": compact, "mask": mask.copy(), "x_index": x_index.copy(), "index": index.copy()})[0]
        yc = reference(ops.nn_interpolate_reference(compact, x_index), params, attrs, mask)
        np.testing.assert_array_equal(y, ops.nn_interpolate_reference(yc, index))
