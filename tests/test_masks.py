"""Masks: counts, determinism, the grid lattice, pooling structure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import masks
from onnx_perforate.errors import MaskError, PerforateError

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
rates = st.floats(0.0, 0.99)


@settings(max_examples=60, deadline=None)
@given(shapes, rates, st.integers(0, 2**31))
def test_uniform_computes_exactly_the_requested_count(shape, rate, seed):
    mask = masks.uniform(shape, rate, seed)
    assert mask.array.dtype == bool and mask.shape == shape
    assert mask.computed == max(1, round((1 - rate) * shape[0] * shape[1]))
    assert mask.kind == "uniform" and mask.rate == rate and mask.seed == seed
    assert np.array_equal(mask.array, masks.uniform(shape, rate, seed).array)


@settings(max_examples=60, deadline=None)
@given(shapes, rates)
def test_grid_is_a_centred_lattice_close_to_the_rate(shape, rate):
    mask = masks.grid(shape, rate)
    rows, cols = np.nonzero(mask.array.any(axis=1))[0], np.nonzero(mask.array.any(axis=0))[0]
    # A lattice: the mask is the outer product of its row and column sets, with constant steps.
    assert np.array_equal(mask.array, np.outer(mask.array.any(axis=1), mask.array.any(axis=0)))
    for axis, size in ((rows, shape[0]), (cols, shape[1])):
        assert len(set(np.diff(axis))) <= 1
        assert abs(axis[0] - (size - 1 - axis[-1])) <= 1  # centred
    assert mask.computed >= 1
    # No other lattice is closer to the target than the chosen one.
    target = 1 - rate
    best = min(abs(-(-shape[0] // sy) * -(-shape[1] // sx) / (shape[0] * shape[1]) - target)
               for sy in range(1, shape[0] + 1) for sx in range(1, shape[1] + 1))
    assert abs((1 - mask.achieved_rate) - target) == pytest.approx(best, abs=1e-9)


def test_grid_reports_achieved_rate():
    mask = masks.grid((111, 111), 0.5)
    assert mask.rate == 0.5 and 0.45 < mask.achieved_rate < 0.55
    assert mask.to_dict()["achieved_rate"] == pytest.approx(mask.achieved_rate, abs=1e-6)
    assert masks.grid((4, 4), 0.0).array.all()
    assert masks.grid((8, 8), 0.75).to_dict()["strides"] == [2, 2]


def test_mask_object_is_numpy_convertible_and_read_only():
    mask = masks.uniform((5, 6), 0.5, seed=1)
    assert np.asarray(mask).shape == (5, 6) and np.asarray(mask).dtype == bool
    assert np.asarray(mask, dtype=np.uint8).max() == 1
    with pytest.raises(ValueError):
        mask.array[0, 0] = True
    assert "uniform" in repr(mask)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rates(rate):
    with pytest.raises(MaskError, match="rate"):
        masks.uniform((4, 4), rate)


def test_bad_shapes_and_empty_arrays():
    with pytest.raises(MaskError, match="2-D"):
        masks.Mask(np.ones((2, 2, 2), bool))
    with pytest.raises(MaskError):
        masks.grid((0, 4), 0.5)
    with pytest.raises(masks.EmptyMaskError):
        masks.from_array(np.zeros((3, 3)))


def _pool_model(pool_attrs, between=("Relu",), pool="MaxPool"):
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv")]
    prev = "c"
    for i, op in enumerate(between):
        nodes.append(helper.make_node(op, [prev], [f"t{i}"], name=f"op{i}"))
        prev = f"t{i}"
    nodes.append(helper.make_node(pool, [prev], ["y"], name="pool", **pool_attrs))
    graph = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_pooling_weights_count_overlapping_windows():
    # Conv output 7x7; MaxPool 3x3 stride 2: rows 0..6 are read by windows starting at 0, 2, 4.
    model = _pool_model(dict(kernel_shape=[3, 3], strides=[2, 2]))
    weights, details = masks.pooling_weights(model, "conv")
    per_axis = np.array([1, 1, 2, 1, 2, 1, 1])
    assert np.array_equal(weights, np.outer(per_axis, per_axis)) and details == {"pool": "pool"}
    mask = masks.pooling_structure(model, "conv", rate=1 - 4 / 49)
    assert mask.kind == "pooling" and mask.computed == 4
    assert set(zip(*np.nonzero(mask.array))) == {(2, 2), (2, 4), (4, 2), (4, 4)}


def test_pooling_weights_with_pads_ceil_mode_and_average_pool():
    model = _pool_model(dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1),
                        between=("Relu", "Sigmoid"), pool="AveragePool")
    weights, _ = masks.pooling_weights(model, "conv")
    assert weights.shape == (7, 7) and (weights == 1).all()


def test_pooling_ties_are_spread_deterministically():
    model = _pool_model(dict(kernel_shape=[1, 1], strides=[1, 1]))
    a = masks.pooling_structure(model, "conv", 0.5, seed=0)
    assert np.array_equal(a.array, masks.pooling_structure(model, "conv", 0.5, seed=0).array)
    assert a.array[4:].any(), "ties must not fill the top rows first"


def test_pooling_without_pool_falls_back_or_raises():
    model = _pool_model(dict(kernel_shape=[2, 2]), between=("Relu", "Flatten"))
    mask = masks.pooling_structure(model, "conv", 0.5)
    assert mask.kind == "uniform" and "fallback" in mask.note
    with pytest.raises(PerforateError, match="'conv'.*no MaxPool"):
        masks.pooling_structure(model, "conv", 0.5, fallback=False)


def test_make_dispatches_by_kind():
    assert masks.make("grid", (4, 4), 0.5).kind == "grid"
    assert masks.make("uniform", (4, 4), 0.5, seed=2).seed == 2
    with pytest.raises(MaskError, match="unknown mask kind"):
        masks.make("checkerboard", (4, 4), 0.5)
