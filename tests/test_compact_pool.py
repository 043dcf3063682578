"""CompactPool (MaxPool / AveragePool on a compact input read through its producer's index): the
compiled CPU kernel in ORT against the explicit form (NNInterpolate + ONNX MaxPool/AveragePool in ORT)
and against the numpy reference, on random inputs; the Python fallback and the reference evaluator;
bad attributes and shapes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import masks, ops

from helpers import needs_library, run_fallback, run_ort, run_reference

POOL_OPSET = 19  # AveragePool/MaxPool with ceil_mode fixes and dilations


def compact_pool_model(k, index, attrs, y_positions=None, batch=2, channels=3, element=TensorProto.FLOAT):
    inputs = ["x", "x_index"] + (["y_positions"] if y_positions is not None else [])
    inits = [numpy_helper.from_array(index.astype(np.int64), "x_index")]
    if y_positions is not None:
        inits.append(numpy_helper.from_array(np.asarray(y_positions, np.int64), "y_positions"))
    node = ops.make_compact_pool_node(inputs, "y", "pool", **attrs)
    graph = helper.make_graph([node], "compact_pool", [helper.make_tensor_value_info("x", element, [batch, channels, k])],
                              [helper.make_tensor_value_info("y", element, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", POOL_OPSET), ops.opset_import()])


def explicit_model(k, index, attrs, y_positions=None, batch=2, channels=3, element=TensorProto.FLOAT):
    """NNInterpolate, then ONNX's own pooling op (and a Gather of the requested positions)."""
    op = "MaxPool" if attrs["mode"] == "max" else "AveragePool"
    pool_attrs = {key: v for key, v in attrs.items() if key != "mode"}
    if op == "MaxPool":
        pool_attrs.pop("count_include_pad", None)
    nodes = [ops.make_nn_interpolate_node("x", "x_index", "full", "interpolate"),
             helper.make_node(op, ["full"], ["pooled"], name="pool", **pool_attrs)]
    inits = [numpy_helper.from_array(index.astype(np.int64), "x_index")]
    out = "pooled"
    if y_positions is not None:
        inits += [numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat"),
                  numpy_helper.from_array(np.asarray(y_positions, np.int64), "y_positions")]
        nodes += [helper.make_node("Reshape", ["pooled", "flat"], ["pooled_flat"]),
                  helper.make_node("Gather", ["pooled_flat", "y_positions"], ["picked"], axis=2)]
        out = "picked"
    graph = helper.make_graph(nodes, "explicit", [helper.make_tensor_value_info("x", element, [batch, channels, k])],
                              [helper.make_tensor_value_info(out, element, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", POOL_OPSET), ops.opset_import()])


CASES = {
    # name: (grid, rate, attributes, batch)
    "max 3x3 s2 (SqueezeNet pool1)": ((13, 13), 0.5, dict(mode="max", kernel_shape=[3, 3], strides=[2, 2]), 1),
    "max ceil_mode": ((12, 11), 0.6, dict(mode="max", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), 3),
    "max pads, strides (1, 2)": ((9, 10), 0.4, dict(mode="max", kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 1]), 2),
    "max dilations": ((11, 11), 0.5, dict(mode="max", kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 1, 1, 1]), 2),
    "average pads, count_include_pad": ((10, 9), 0.5, dict(mode="average", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1), 2),
    "average pads, no count_include_pad": ((10, 9), 0.5, dict(mode="average", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0), 2),
    "average ceil_mode, pads": ((12, 12), 0.7, dict(mode="average", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1, count_include_pad=1), 3),
    "average 2x2 s2": ((8, 8), 0.3, dict(mode="average", kernel_shape=[2, 2], strides=[2, 2]), 2),
}


def compact_input(grid, rate, batch, channels, seed, ties):
    mask = masks.uniform(grid, rate, seed=seed).array
    index = ops.nearest_index(mask)
    rng = np.random.default_rng(seed)
    shape = (batch, channels, int(mask.sum()))
    # Small integers give ties inside the windows (max pooling must not care which one it takes).
    x = rng.integers(-3, 4, shape).astype(np.float32) if ties else rng.standard_normal(shape).astype(np.float32)
    return mask, index, x


@needs_library
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("name", list(CASES))
def test_compact_pool_matches_explicit_form_and_reference(name, ties):
    grid, rate, attrs, batch = CASES[name]
    mask, index, x = compact_input(grid, rate, batch, 3, seed=len(name), ties=ties)
    got = run_ort(compact_pool_model(x.shape[2], index, attrs, batch=batch), x, threads=2)[0]
    explicit = run_ort(explicit_model(x.shape[2], index, attrs, batch=batch), x, threads=2)[0]
    reference = ops.compact_pool_reference(x, index, **attrs)
    assert got.shape == explicit.shape == reference.shape
    np.testing.assert_allclose(got, explicit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    if attrs["mode"] == "max":
        np.testing.assert_array_equal(got, explicit)  # max pooling is exact


@needs_library
@pytest.mark.parametrize("name", ["max ceil_mode", "average pads, count_include_pad"])
def test_y_positions_compute_only_those_outputs(name):
    grid, rate, attrs, batch = CASES[name]
    mask, index, x = compact_input(grid, rate, batch, 4, seed=7, ties=False)
    full = ops.compact_pool_reference(x, index, **attrs)
    positions = np.sort(np.random.default_rng(1).choice(full.shape[2] * full.shape[3], 9, replace=False))
    got = run_ort(compact_pool_model(x.shape[2], index, attrs, positions, batch=batch, channels=4), x, threads=1)[0]
    explicit = run_ort(explicit_model(x.shape[2], index, attrs, positions, batch=batch, channels=4), x, threads=2)[0]
    assert got.shape == (batch, 4, 9)
    np.testing.assert_allclose(got, explicit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, full.reshape(batch, 4, -1)[:, :, positions], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_positions", [False, True])
def test_reference_evaluator_runs_compact_pool(with_positions):
    grid, rate, attrs, batch = CASES["average ceil_mode, pads"]
    mask, index, x = compact_input(grid, rate, batch, 3, seed=3, ties=False)
    positions = [0, 5, 17] if with_positions else None
    model = compact_pool_model(x.shape[2], index, attrs, positions, batch=batch)
    got = run_reference(model, x)[0]
    np.testing.assert_allclose(got, ops.compact_pool_reference(x, index, positions, **attrs), rtol=1e-6)
    # The reference is independent of the explicit form's pooling, so check it against ONNX's own.
    explicit = run_reference(explicit_model(x.shape[2], index, attrs, positions, batch=batch), x)[0]
    np.testing.assert_allclose(got, explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_positions", [False, True])
def test_python_fallback_runs_compact_pool(with_positions):
    grid, rate, attrs, batch = CASES["max ceil_mode"]
    mask, index, x = compact_input(grid, rate, batch, 3, seed=5, ties=True)
    positions = [1, 2, 8] if with_positions else None
    model = compact_pool_model(x.shape[2], index, attrs, positions, batch=batch)
    got = run_fallback(model, x)[0]
    np.testing.assert_array_equal(got, ops.compact_pool_reference(x, index, positions, **attrs))


BAD = [
    ({"mode": "min", "kernel_shape": [2, 2]}, None, "attribute 'mode' is 'min'"),
    ({"mode": "max"}, None, "attribute 'kernel_shape' has 0 values"),
    ({"mode": "max", "kernel_shape": [2, 2], "pads": [2, 0, 0, 0]}, None, "'pads' must be smaller than the window"),
    ({"mode": "average", "kernel_shape": [2, 2], "dilations": [2, 2]}, None, "'dilations' must be [1, 1]"),
    ({"mode": "max", "kernel_shape": [2, 2], "auto_pad": "SAME_UPPER"}, None, "'auto_pad' is 'SAME_UPPER'"),
    ({"mode": "max", "kernel_shape": [20, 2]}, None, "does not fit the input grid"),
    ({"mode": "max", "kernel_shape": [2, 2]}, [0, 1000], "input Y_positions has value 1000"),
    ({"mode": "max", "kernel_shape": [2, 2]}, [], "input Y_positions has shape [0]"),  # gave every position
    ({"mode": "max", "kernel_shape": [2**62, 2], "dilations": [4, 1]}, None, "overflows 64-bit integers"),
    ({"mode": "max", "kernel_shape": [2**16, 2**15]}, None, "2^31 taps"),
]


@needs_library
@pytest.mark.parametrize("attrs, positions, message", BAD, ids=[b[2] for b in BAD])
def test_bad_attributes_name_the_node(attrs, positions, message):
    mask, index, x = compact_input((8, 8), 0.5, 1, 2, seed=0, ties=False)
    model = compact_pool_model(x.shape[2], index, attrs, positions, batch=1, channels=2)
    with pytest.raises(Exception) as info:
        run_ort(model, x, threads=2)[0]
    assert "CompactPool node 'pool'" in str(info.value) and message in str(info.value)


@needs_library
def test_bad_shapes_name_the_node():
    mask, index, x = compact_input((8, 8), 0.5, 1, 2, seed=0, ties=False)
    attrs = dict(mode="max", kernel_shape=[2, 2])
    bad_index = index.copy()
    bad_index[0, 0] = x.shape[2]
    with pytest.raises(Exception) as info:
        run_ort(compact_pool_model(x.shape[2], bad_index, attrs, batch=1, channels=2), x, threads=2)[0]
    assert "CompactPool node 'pool'" in str(info.value) and "input X_index has value" in str(info.value)
    four_d = compact_pool_model(x.shape[2], index, attrs, batch=1, channels=2)
    four_d.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 1
    with pytest.raises(Exception) as info:
        run_ort(four_d, x[..., None], threads=2)[0]
    assert "CompactPool node 'pool'" in str(info.value) and "expected 3-D [N, C, K_in]" in str(info.value)


# --- the CUDA kernel: its host-side table (no GPU needed) and, on a GPU, the kernel itself -------------


@pytest.fixture(scope="module")
def cuda_kernels_lib():
    from onnx_perforate import LibraryNotFoundError, cuda_kernels

    try:
        return cuda_kernels.load()
    except LibraryNotFoundError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("name", ["max 3x3 s2 (SqueezeNet pool1)", "max dilations", "average pads, count_include_pad",
                                  "average ceil_mode, pads", "average pads, no count_include_pad"])
def test_cuda_pool_table_describes_each_window(cuda_kernels_lib, name):
    """Pooling the compact input through the table (as the CUDA kernel does, here in numpy) gives the
    reference; each output's entries are the distinct compact entries of its window."""
    from onnx_perforate.cuda_kernels import pool_table

    grid, rate, attrs, batch = CASES[name]
    mask, index, x = compact_input(grid, rate, batch, 3, seed=11, ties=False)
    begin, entries, weights, out_hw = pool_table(cuda_kernels_lib, index, x.shape[2], attrs)
    want = ops.compact_pool_reference(x, index, **attrs)
    assert out_hw == want.shape[2:] and len(begin) == out_hw[0] * out_hw[1] + 1
    got = np.empty(want.shape[:2] + (len(begin) - 1,), np.float32)
    for o in range(len(begin) - 1):
        taken = x[:, :, entries[begin[o]:begin[o + 1]]]
        assert len(set(entries[begin[o]:begin[o + 1]].tolist())) == begin[o + 1] - begin[o]
        got[:, :, o] = taken.max(axis=2) if weights is None else (taken * weights[begin[o]:begin[o + 1]]).sum(axis=2)
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_cuda_pool_table_errors(cuda_kernels_lib):
    from onnx_perforate.cuda_kernels import pool_table

    mask, index, x = compact_input((8, 8), 0.5, 1, 2, seed=0, ties=False)
    with pytest.raises(ValueError, match="'pads' must be smaller"):
        pool_table(cuda_kernels_lib, index, x.shape[2], dict(mode="max", kernel_shape=[2, 2], pads=[2, 0, 0, 0]))
    with pytest.raises(ValueError, match="input X_index has value"):
        pool_table(cuda_kernels_lib, index, 1, dict(mode="max", kernel_shape=[2, 2]))  # K_in = 1: index values >= 1
    with pytest.raises(ValueError, match="input Y_positions has value 49"):
        pool_table(cuda_kernels_lib, index, x.shape[2], dict(mode="max", kernel_shape=[2, 2]), [0, 49])
    assert cuda_kernels_lib.onnx_perforate_cuda_compact_pool(None, None, None, None, 2, 1, 4, 4, None, None) != 0
    assert cuda_kernels_lib.onnx_perforate_cuda_compact_pool(None, None, None, None, 0, 0, 4, 4, None, None) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_compact_pool_matches_reference(cuda_kernels_lib, name):
    torch = pytest.importorskip("torch", reason="the GPU test drives the kernel on PyTorch CUDA tensors")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from onnx_perforate.cuda_kernels import POOL_MODES, pool_table

    grid, rate, attrs, batch = CASES[name]
    mask, index, x = compact_input(grid, rate, batch, 5, seed=2, ties=True)
    positions = np.arange(0, 40, 3)
    for y_positions in (None, positions):
        begin, entries, weights, out_hw = pool_table(cuda_kernels_lib, index, x.shape[2], attrs, y_positions)
        device = [torch.from_numpy(a).cuda() if a is not None else None for a in (x, begin, entries, weights)]
        count = len(begin) - 1
        y = torch.empty((batch, 5, count), device="cuda")
        status = cuda_kernels_lib.onnx_perforate_cuda_compact_pool(
            *[t.data_ptr() if t is not None else None for t in device], POOL_MODES[attrs["mode"]], batch * 5,
            x.shape[2], count, y.data_ptr(), torch.cuda.current_stream().cuda_stream)
        assert status == 0
        torch.cuda.synchronize()
        want = ops.compact_pool_reference(x, index, y_positions, **attrs).reshape(batch, 5, count)
        np.testing.assert_allclose(y.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("require_library")
@pytest.mark.parametrize("mode", ["max", "average"])
def test_fixed_width_windows_match_the_explicit_form(mode):
    """Grid masks give windows of one width: the CPU kernel's fixed-width loop (padded windows)."""
    mask = masks.grid((27, 27), 0.75).array
    index = ops.nearest_index(mask)
    attrs = dict(mode=mode, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
    x = np.random.default_rng(4).integers(-3, 4, (2, 5, int(mask.sum()))).astype(np.float32)
    for positions in (None, np.arange(0, 196, 5)):
        got = run_ort(compact_pool_model(x.shape[2], index, attrs, positions, channels=5), x)[0]
        want = run_ort(explicit_model(x.shape[2], index, attrs, positions, channels=5), x)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, ops.compact_pool_reference(x, index, positions, **attrs), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("require_library")
@pytest.mark.parametrize("mask_kind", ["grid", "uniform"])  # windows of one width (fixed loop) and of several
def test_many_planes_at_once_match_the_explicit_form(mask_kind):
    """Max pooling takes eight planes per pass over the window table: 20 planes are two such groups and
    four single planes; ties included."""
    grid = (28, 28)
    mask = (masks.grid(grid, 0.5) if mask_kind == "grid" else masks.uniform(grid, 0.5, seed=2)).array
    index = ops.nearest_index(mask)
    attrs = dict(mode="max", kernel_shape=[2, 2], strides=[2, 2])
    x = np.random.default_rng(3).integers(-3, 4, (4, 5, int(mask.sum()))).astype(np.float32)
    for positions in (None, np.arange(1, 196, 3)):
        got = run_ort(compact_pool_model(x.shape[2], index, attrs, positions, batch=4, channels=5), x)[0]
        np.testing.assert_array_equal(got, run_ort(explicit_model(x.shape[2], index, attrs, positions, batch=4,
                                                                  channels=5), x)[0])


# (channels, batch): under 16 channels (plane by plane), a partial vector of channels, two vectors (the
# second partial), batch 2 (per-image transposes).
EIGHT_BIT = [(5, 2), (40, 1), (80, 2), (64, 2)]  # 64: whole vectors, no masked tail


@pytest.mark.usefixtures("require_library")
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("channels, batch", EIGHT_BIT)
def test_eight_bit_max_pooling_matches_the_explicit_form(dtype, channels, batch):
    """uint8 / int8 CompactPool (PerforatedQLinearConv's compact outputs) against NNInterpolate + ONNX
    MaxPool on the same bytes, exactly, full and at Y_positions, with windows of several widths; int8
    compares signed (a max over unsigned bytes would rank -1 above 1)."""
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    # 64 channels on a 7x7 grid: fewer than 16 compact entries and outputs (the transposes' scalar edges)
    mask = masks.uniform((7, 7) if channels == 64 else (23, 23), 0.7 if channels == 64 else 0.5, seed=channels).array
    index = ops.nearest_index(mask)
    attrs = dict(mode="max", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    info = np.iinfo(dtype)
    x = np.random.default_rng(channels).integers(info.min, info.max + 1, (batch, channels, int(mask.sum())), dtype=dtype)
    for positions in (None, np.arange(2, 16 if channels == 64 else 144, 5)):
        got = run_ort(compact_pool_model(x.shape[2], index, attrs, positions, batch, channels, element), x)[0]
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, run_ort(explicit_model(x.shape[2], index, attrs, positions, batch, channels,
                                                                  element), x)[0])
        np.testing.assert_array_equal(got, ops.compact_pool_reference(x, index, positions, **attrs))
        np.testing.assert_array_equal(got, run_fallback(compact_pool_model(x.shape[2], index, attrs, positions, batch,
                                                                           channels, element), x)[0])


@needs_library
def test_eight_bit_average_pooling_is_refused_naming_the_node():
    mask, index, _ = compact_input((8, 8), 0.5, 1, 2, seed=0, ties=False)
    x = np.zeros((1, 2, int(mask.sum())), np.uint8)
    model = compact_pool_model(x.shape[2], index, dict(mode="average", kernel_shape=[2, 2]), batch=1, channels=2,
                               element=TensorProto.UINT8)
    with pytest.raises(Exception) as info:
        run_ort(model, x)[0]
    assert "CompactPool" in str(info.value) and "8-bit" in str(info.value) and "'max'" in str(info.value)
