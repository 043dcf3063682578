"""rewrite() on real models: SqueezeNet 1.1 and the CIFAR-10 CNN from ../shared, and the bundled
sample models against their golden outputs. Each part skips with the reason when its files are absent."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnx_perforate
from onnx_perforate import masks
from onnx_perforate.data import PRESETS, Dataset, load_arrays, load_folder
from onnx_perforate.fallback import session

from helpers import SAMPLE_MODELS, needs_library, run_backend, run_ort, shared_file


def _grid_3x3(model, rate=0.5):
    return {r.name: masks.grid(r.output_shape[2:], rate) for r in onnx_perforate.inspect(model)
            if r.perforable and r.kernel == (3, 3)}


def _accuracy(model, dataset, batch):
    sess = session(model, 2)
    name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    hits = []
    for x, y in dataset.batches(batch):
        hits.append(sess.run(None, {name: x})[0].reshape(len(x), -1).argmax(1) == y)
    return float(np.concatenate(hits).mean())


def _check(model):
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)


def _grid_rewrite(*path):
    """The model at ../shared/<path>, its grid masks at rate 0.5 on the 3x3 Convs, the rewrite and its report."""
    original = onnx.load(shared_file(*path))
    chosen = _grid_3x3(original)
    return original, chosen, *onnx_perforate.rewrite_with_report(original, chosen)


@pytest.fixture(scope="module")
def squeezenet_grid():
    return _grid_rewrite("data", "imagenet", "squeezenet1.1.onnx")


@pytest.mark.shared
def test_squeezenet_grid_half_on_3x3(squeezenet_grid):
    original, chosen, perforated, report = squeezenet_grid
    assert len(chosen) == 9  # conv1 and the eight expand3x3 layers
    _check(perforated)
    assert all(l.fused_activation == "Relu" for l in report.layers)
    assert 1.3 < report.mac_reduction < 1.5


@pytest.mark.shared
@needs_library
def test_squeezenet_grid_half_accuracy(squeezenet_grid):
    original, _, perforated, _ = squeezenet_grid
    data = load_folder(shared_file("data", "imagenet", "val100"), PRESETS["caffe"], limit=50)  # keeps the file fast
    base, perf = _accuracy(original, data, 1), _accuracy(perforated, data, 1)
    print(f"SqueezeNet 1.1 top-1 on 50 val images: {base:.3f} -> {perf:.3f} (grid r=0.5 on 3x3 convs)")
    assert 0.35 < base < 0.85 and 0.0 < perf <= 1.0


@pytest.fixture(scope="module")
def cifar_grid():
    return _grid_rewrite("data", "cifar10", "cifar10_keras_cnn.onnx")


@pytest.mark.shared
def test_cifar_grid_half_on_3x3(cifar_grid):
    original, chosen, perforated, report = cifar_grid
    assert len(chosen) == 6
    _check(perforated)
    # Conv -> Relu -> BN: the Relu is fused and the BN runs on the compact tensor.
    assert all(l.fused_activation == "Relu" and l.interpolated_late for l in report.layers)
    ones = {k: np.ones(m.shape, bool) for k, m in chosen.items()}
    x = np.load(shared_file("data", "cifar10", "cifar10_test.npz"))["images"][:8].transpose(0, 3, 1, 2)
    x = x.astype(np.float32)
    want = run_ort(original, {"input": x}, library=False)[0]
    exact = onnx_perforate.rewrite(original, ones)
    # (not onnx.reference: it runs opset-13 BatchNormalization in training mode)
    got = session(exact).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.shared
@needs_library
def test_cifar_grid_half_accuracy(cifar_grid):
    original, _, perforated, _ = cifar_grid
    # The test set is sorted by class: take every 10th image for a balanced 1000.
    full = load_arrays(shared_file("data", "cifar10", "cifar10_test.npz"), input_shape=["N", 3, 32, 32])
    x_all = full.load(0, len(full))[::10]
    data = Dataset(len(x_all), lambda a, b: x_all[a:b], full.labels[::10])
    base, perf = _accuracy(original, data, 100), _accuracy(perforated, data, 100)
    print(f"CIFAR-10 CNN top-1 on 1000 test images: {base:.3f} -> {perf:.3f} (grid r=0.5 on 3x3 convs)")
    assert base > 0.7 and 0.1 < perf <= 1.0


def _manifest():
    path = SAMPLE_MODELS / "manifest.json"
    return json.loads(path.read_text())["models"] if path.is_file() else {}


@pytest.mark.skipif(not _manifest(), reason="sample_models/manifest.json is not built yet")
@pytest.mark.parametrize("stem", sorted(_manifest()) or ["none"])
def test_sample_model_rewrite_matches_golden(stem, backend):
    entry = _manifest()[stem]
    golden = SAMPLE_MODELS / "golden" / f"{stem}.npz"
    if not golden.is_file():
        pytest.skip(f"{golden} is absent")
    model = onnx.load(SAMPLE_MODELS / entry["file"])
    ones = {r.name: np.ones(r.output_shape[2:], bool) for r in onnx_perforate.inspect(model) if r.perforable}
    perforated = onnx_perforate.rewrite(model, ones)
    _check(perforated)
    with np.load(golden) as g:
        x, expected = g["input"], g["output"]
    feed = {entry["input"]["name"]: x}
    got = run_backend(backend, perforated, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    grid = onnx_perforate.rewrite(model, {k: masks.grid(v.shape, 0.5) for k, v in ones.items()})
    _check(grid)
