"""rewrite() on real models: SqueezeNet 1.1 and the CIFAR-10 CNN from ../shared, and the bundled
sample models against their golden outputs. Each part skips with the reason when its files are absent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_perforate
from onnx_perforate import masks, ops
from onnx_perforate.data import PRESETS, Dataset, load_arrays, load_folder
from onnx_perforate.fallback import session

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SQUEEZENET = SHARED / "imagenet" / "squeezenet1.1.onnx"
CIFAR = SHARED / "cifar10" / "cifar10_keras_cnn.onnx"
SAMPLE = ROOT / "sample_models"
needs_library = pytest.mark.skipif(not onnx_perforate.has_library(),
                                   reason="compiled custom-op library not found (install the package or set ONNX_PERFORATE_LIBRARY)")


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


@pytest.mark.shared
@pytest.mark.skipif(not SQUEEZENET.is_file(), reason="../shared/data/imagenet/squeezenet1.1.onnx is absent")
def test_squeezenet_grid_half_on_3x3():
    original = onnx.load(SQUEEZENET)
    chosen = _grid_3x3(original)
    assert len(chosen) == 9  # conv1 and the eight expand3x3 layers
    perforated, report = onnx_perforate.rewrite_with_report(original, chosen)
    _check(perforated)
    assert all(l.fused_activation == "Relu" for l in report.layers)
    assert 1.3 < report.mac_reduction < 1.5
    if not onnx_perforate.has_library():
        pytest.skip("accuracy needs the compiled custom-op library")
    data = load_folder(SHARED / "imagenet" / "val100", PRESETS["caffe"], limit=50)  # keeps the file fast
    base, perf = _accuracy(original, data, 1), _accuracy(perforated, data, 1)
    print(f"SqueezeNet 1.1 top-1 on 50 val images: {base:.3f} -> {perf:.3f} (grid r=0.5 on 3x3 convs)")
    assert 0.35 < base < 0.85 and 0.0 < perf <= 1.0


@pytest.mark.shared
@pytest.mark.skipif(not CIFAR.is_file(), reason="../shared/data/cifar10/cifar10_keras_cnn.onnx is absent")
def test_cifar_grid_half_on_3x3():
    original = onnx.load(CIFAR)
    chosen = _grid_3x3(original)
    assert len(chosen) == 6
    perforated, report = onnx_perforate.rewrite_with_report(original, chosen)
    _check(perforated)
    # Conv -> Relu -> BN: the Relu is fused and the BN runs on the compact tensor.
    assert all(l.fused_activation == "Relu" and l.interpolated_late for l in report.layers)
    ones = {k: np.ones(m.shape, bool) for k, m in chosen.items()}
    x = np.load(SHARED / "cifar10" / "cifar10_test.npz")["images"][:8].transpose(0, 3, 1, 2).astype(np.float32)
    want = ort.InferenceSession(str(CIFAR), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    exact = onnx_perforate.rewrite(original, ones)
    # (not onnx.reference: it runs opset-13 BatchNormalization in training mode)
    got = session(exact).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if not onnx_perforate.has_library():
        pytest.skip("accuracy needs the compiled custom-op library")
    # The test set is sorted by class: take every 10th image for a balanced 1000.
    full = load_arrays(SHARED / "cifar10" / "cifar10_test.npz", input_shape=["N", 3, 32, 32])
    x_all = full.load(0, len(full))[::10]
    data = Dataset(len(x_all), lambda a, b: x_all[a:b], full.labels[::10])
    base, perf = _accuracy(original, data, 100), _accuracy(perforated, data, 100)
    print(f"CIFAR-10 CNN top-1 on 1000 test images: {base:.3f} -> {perf:.3f} (grid r=0.5 on 3x3 convs)")
    assert base > 0.7 and 0.1 < perf <= 1.0


def _manifest():
    path = SAMPLE / "manifest.json"
    return json.loads(path.read_text())["models"] if path.is_file() else {}


@pytest.mark.skipif(not _manifest(), reason="sample_models/manifest.json is not built yet")
@pytest.mark.parametrize("stem", sorted(_manifest()) or ["none"])
def test_sample_model_rewrite_matches_golden(stem):
    entry = _manifest()[stem]
    golden = SAMPLE / "golden" / f"{stem}.npz"
    if not golden.is_file():
        pytest.skip(f"{golden} is absent")
    model = onnx.load(SAMPLE / entry["file"])
    ones = {r.name: np.ones(r.output_shape[2:], bool) for r in onnx_perforate.inspect(model) if r.perforable}
    perforated = onnx_perforate.rewrite(model, ones)
    _check(perforated)
    with np.load(golden) as g:
        x, expected = g["input"], g["output"]
    feed = {entry["input"]["name"]: x}
    got = ops.reference_evaluator(perforated).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if onnx_perforate.has_library():
        got = session(perforated).run(None, feed)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    grid = onnx_perforate.rewrite(model, {k: masks.grid(v.shape, 0.5) for k, v in ones.items()})
    _check(grid)
