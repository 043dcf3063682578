"""The CPU kernel under hostile shapes and attributes: a fuzz over strides, dilations, pads, groups, the
number of computed positions K, the batch and the channels (down to 0) against the numpy reference, on
every GEMM path; attributes whose geometry overflows int64 get a clear error, as ONNX Runtime's Conv
gives; errors name the node and the element type."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import ops

from helpers import assert_close_to_reference, bad_model, expect_error, needs_library, ort_conv, perforated_model, run_ort

pytestmark = needs_library


def fuzz_case(rng: np.random.Generator):
    """A valid PerforatedConv call: shapes, attributes and mask, channels and batch down to 0."""
    depthwise = rng.random() < 0.2
    group = 1 if depthwise else int(rng.choice([1, 1, 2, 3]))
    cg = 1 if depthwise else int(rng.choice([0, 1, 2, 3, 5, 17]))
    channels = int(rng.integers(1, 5)) if depthwise else cg * group
    if depthwise:
        group = channels
    m = group * int(rng.choice([0, 1, 2, 3, 7]) if rng.random() < 0.9 else 0)
    kernel = tuple(int(v) for v in rng.integers(1, 4, 2))
    strides = tuple(int(v) for v in rng.integers(1, 4, 2))
    dilations = tuple(int(v) for v in rng.integers(1, 4, 2))
    pads = tuple(int(v) for v in rng.integers(0, 4, 4))
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    h = int(rng.integers(max(1, effective[0] - pads[0] - pads[2]), 11))
    w = int(rng.integers(max(1, effective[1] - pads[1] - pads[3]), 11))
    n = int(rng.choice([0, 1, 1, 2, 3]))
    attrs = ops.ConvAttributes(kernel, strides, pads, dilations, group, activation=str(rng.choice(ops.ACTIVATIONS)),
                               alpha=0.2, clip_min=-0.5, clip_max=0.7)
    ho, wo = ops.conv_output_size((h, w), kernel, strides, pads, dilations)
    kind = rng.choice(["one", "all", "random"])
    mask = np.ones((ho, wo), bool) if kind == "all" else rng.random((ho, wo)) < rng.uniform(0.1, 0.9)
    if kind == "one":
        mask[:] = False
    mask.flat[rng.integers(mask.size)] = True
    x = rng.standard_normal((n, channels, h, w)).astype(np.float32)
    weights = rng.standard_normal((m, cg, *kernel)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32) if rng.random() < 0.7 else None
    return x, weights, bias, mask, attrs


def check_case(x, weights, bias, mask, attrs):
    yc = run_ort(perforated_model(x.shape, weights, bias, mask, attrs, interpolate=False), {"x": x}, threads=2)[0]
    assert_close_to_reference(yc, x, weights, bias, mask, attrs)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_fuzz_against_the_reference(seed):
    check_case(*fuzz_case(np.random.default_rng(seed)))


@pytest.mark.parametrize("gemm", ["avx2", "openblas"])
def test_fuzz_on_the_other_gemm_paths(gemm):
    """The same fuzz (fixed seeds) with the AVX2 micro-kernels and with OpenBLAS, in a subprocess: the
    path is chosen once per process, and a crash there fails this test instead of killing the run."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        sys.path[:0] = [{tests!r}]
        from test_kernel_guards import check_case, fuzz_case
        for seed in range(60):
            check_case(*fuzz_case(np.random.default_rng(seed)))
        print("ok")
        """
    ).format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, ONNX_PERFORATE_GEMM=gemm),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-3000:])


@pytest.mark.parametrize("gemm", ["", "avx2", "openblas"])
def test_zero_input_channels_give_the_bias_like_ort_conv(gemm):
    """X [1, 0, 8, 8] and W [6, 0, 3, 3]: ORT's Conv returns the bias; the kernel once divided by zero
    (SIGFPE) on the AVX-512 path. Run in a subprocess so that a crash is a failure, not the end of pytest."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        sys.path[:0] = [{tests!r}]
        from helpers import ort_conv, perforated_model, run_ort
        from onnx_perforate import ops
        rng = np.random.default_rng(0)
        for n, group, pads in [(1, 1, (0, 0, 0, 0)), (2, 1, (1, 1, 1, 1)), (1, 2, (1, 0, 2, 1))]:
            x = np.zeros((n, 0, 8, 8), np.float32)
            w = np.zeros((6, 0, 3, 3), np.float32)
            b = rng.standard_normal(6).astype(np.float32)
            attrs = ops.ConvAttributes((3, 3), pads=pads, group=group, activation="Relu")
            want = np.maximum(ort_conv(x, w, b, ops.ConvAttributes((3, 3), pads=pads, group=group)), 0)
            mask = rng.random(want.shape[2:]) < 0.5
            mask[0, 0] = True
            got = run_ort(perforated_model(x.shape, w, b, mask, attrs), {{"x": x}}, threads=2)[0]
            assert got.shape == want.shape and np.array_equal(got[..., mask], want[..., mask]), (got, want)
        print("ok")
        """
    ).format(tests=os.path.dirname(__file__))
    env = dict(os.environ, ONNX_PERFORATE_GEMM=gemm) if gemm else dict(os.environ)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-3000:])


def geometry_model(attrs: ops.ConvAttributes, x_shape=(1, 2, 6, 6), w_shape=(3, 2, 3, 3), mask_shape=(4, 4)):
    node = ops.make_perforated_conv_node(["x", "w", "", "mask"], "y", attrs, "huge")
    inits = [numpy_helper.from_array(np.ones(w_shape, np.float32), "w"),
             numpy_helper.from_array(np.ones(mask_shape, bool), "mask")]
    return bad_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], inits), {
        "x": np.ones(x_shape, np.float32)}


@pytest.mark.parametrize("attrs, fragment", [
    (ops.ConvAttributes((3, 3), dilations=(2**62, 1)), "overflows 64-bit integers"),
    (ops.ConvAttributes((3, 3), dilations=(1, 2**62 + 1)), "overflows 64-bit integers"),
    (ops.ConvAttributes((3, 3), pads=(2**62, 0, 2**62, 0)), "overflows 64-bit integers"),
    (ops.ConvAttributes((3, 3), pads=(0, 2**62, 0, 2**62 - 1)), "overflows 64-bit integers"),
    (ops.ConvAttributes((3, 3), pads=(2**40, 0, 0, 0)), "2^31"),
    (ops.ConvAttributes((3, 3), dilations=(2**40, 1)), "smaller than the dilated kernel"),
    (ops.ConvAttributes((0, 0)), "'kernel_shape' is [0, 0], expected 2 positive values"),  # was read as W's 3x3
])
def test_geometry_overflow_is_a_clear_error(attrs, fragment):
    model, feeds = geometry_model(attrs)
    expect_error(model, feeds, "PerforatedConv node 'huge'", fragment)


def test_the_padded_size_is_the_padded_one():
    model, feeds = geometry_model(ops.ConvAttributes((3, 3), dilations=(4, 1), pads=(1, 0, 1, 0)))
    expect_error(model, feeds, "the padded input [8, 6] (input [6, 6] plus pads)", "[9, 3]")


def test_a_mask_of_another_element_type_is_named():
    model, feeds = geometry_model(ops.ConvAttributes((3, 3)))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((4, 4), np.int32), "mask"))
    expect_error(model, feeds, "element type int32", "bool or uint8")


def test_errors_at_kernel_creation_name_the_node():
    model, feeds = geometry_model(ops.ConvAttributes((3, 3)))
    model.graph.node[0].attribute.append(helper.make_attribute("activation", "Gelu"))
    expect_error(model, feeds, "PerforatedConv node 'huge'", "Gelu")
    assert "'?'" not in str(pytest.raises(Exception, run_ort, model, feeds).value)


def test_ort_conv_refuses_the_same_overflow():
    """The reference point: ONNX Runtime's own Conv reports these attributes as an error too."""
    with pytest.raises(Exception):
        ort_conv(np.ones((1, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3), np.float32), None,
                 ops.ConvAttributes((3, 3), dilations=(2**62, 1)))
