"""Impact masks: the impact map, nesting of the iterative variant, and that impact beats the baseline
masks on a real model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnx_perforate
from onnx_perforate import impact, masks
from onnx_perforate.calibration import calibration_set
from onnx_perforate.errors import PerforateError

from helpers import needs_library, shared_file, synthetic_cnn, synthetic_input

pytestmark = needs_library


def calibration(n=16):
    x = synthetic_input(n)
    return [{"x": x[i : i + 8]} for i in range(0, n, 8)]


def test_spatial_convs_lists_the_3x3_convs():
    assert impact.spatial_convs(synthetic_cnn()) == {"conv1": "c1", "conv2": "c2"}


def test_top_positions_prefers_high_impact_and_breaks_ties_row_major():
    g = np.array([[1.0, 5.0, 5.0], [0.0, 5.0, 2.0]])
    np.testing.assert_array_equal(impact.top_positions(g, 2), [[False, True, True], [False, False, False]])
    allowed = np.array([[True, False, True], [True, True, True]])
    np.testing.assert_array_equal(impact.top_positions(g, 2, allowed), [[False, False, True], [False, True, False]])


def test_interpolation_index_is_flat_and_maps_computed_positions_to_themselves():
    mask = np.array([[True, False, False], [False, False, True]])
    index = impact.interpolation_index(mask)
    assert index.shape == mask.shape
    assert index[0, 0] == 0 and index[1, 2] == 5
    assert set(index.ravel()) <= {0, 5}


def test_impact_masks_have_the_requested_rates_and_rewrite_accepts_them():
    model = synthetic_cnn()
    result = impact.impact(model, calibration(), 0.5)
    assert set(result) == {"conv1", "conv2"}
    for name, mask in result.items():
        assert mask.kind == "impact"
        assert mask.computed == masks.computed_count(mask.shape, 0.5)
    perforated = onnx_perforate.rewrite(model, result)
    session = ort.InferenceSession(perforated.SerializeToString(), onnx_perforate.session_options(1))
    assert np.isfinite(session.run(None, {"x": synthetic_input(2)})[0]).all()


def test_iterative_masks_are_nested_and_recomputed_on_the_perforated_network():
    model = synthetic_cnn()
    data = calibration()
    cal = calibration_set(model, data)
    convs = impact.spatial_convs(model)
    estimator = impact.ImpactEstimator(model, cal, convs)
    first = estimator.impact()
    half = {name: impact.top_positions(g, g.size // 2) for name, g in first.items()}
    again = estimator.impact(half)
    for name in convs:
        # Skipped positions have exactly zero impact on the perforated network...
        assert (again[name][~half[name]] == 0).all()
        # ...and the computed ones differ from the unperforated network's impact (it is recomputed).
        assert not np.allclose(again[name][half[name]], first[name][half[name]])
    iterative = impact.impact(model, data, 0.6, steps=3)
    for name, mask in iterative.items():
        assert mask.kind == "iterative_impact"
        assert mask.computed == masks.computed_count(mask.shape, 0.6)


def test_per_layer_rates_and_unknown_layer():
    model = synthetic_cnn()
    result = impact.impact(model, calibration(8), {"conv2": 0.75})
    assert list(result) == ["conv2"]
    with pytest.raises(PerforateError, match="conv9"):
        impact.impact(model, calibration(8), {"conv9": 0.5})


def _cifar():
    path = shared_file("data", "cifar10", "cifar10_keras_cnn.onnx")
    data = np.load(shared_file("data", "cifar10", "cifar10_test.npz"))
    x = data["images"].transpose(0, 3, 1, 2).astype(np.float32)
    return path, x, data["labels"]


def _loss(model, x, y):
    session = ort.InferenceSession(model.SerializeToString(), onnx_perforate.session_options(2))
    logits = np.concatenate([session.run(None, {"input": x[i : i + 100]})[0] for i in range(0, len(x), 100)])
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.shared
def test_impact_beats_uniform_and_grid_on_the_cifar_cnn():
    """The paper's claim on a real model: at the same rate, impact masks raise the loss least.
    Calibration and evaluation use disjoint images (the test set is sorted by class: strided picks)."""
    path, x, y = _cifar()
    calib = [({"input": x[i : i + 2000 : 10][:32]}, y[i : i + 2000 : 10][:32]) for i in range(0, 10000, 2000)]
    eval_x, eval_y = x[5::10], y[5::10]
    import onnx

    model = onnx.load(path)
    convs = impact.spatial_convs(model)
    rate = 0.5
    losses = {}
    for kind in ("uniform", "grid", "impact"):
        if kind == "impact":
            chosen = impact.impact(model, calib, rate)
        else:
            chosen = {r.name: masks.make(kind, tuple(r.output_shape[2:]), rate, seed=0)
                      for r in onnx_perforate.inspect(model) if r.name in convs}
        losses[kind] = _loss(onnx_perforate.rewrite(model, chosen), eval_x, eval_y)
    base = _loss(model, eval_x, eval_y)
    assert losses["impact"] < losses["uniform"] and losses["impact"] < losses["grid"], (base, losses)
