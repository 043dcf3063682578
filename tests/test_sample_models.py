"""Regression tests for the bundled Fashion-MNIST sample models.

Needs only numpy, onnx and onnxruntime (torch is a build-time dependency of
sample_models/build_sample_models.py, never of these files).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from helpers import SAMPLE_MODELS

MANIFEST = json.loads((SAMPLE_MODELS / "manifest.json").read_text())
MODELS = sorted(MANIFEST["models"])


def _session(entry: dict) -> ort.InferenceSession:
    return ort.InferenceSession(str(SAMPLE_MODELS / entry["file"]),
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def subset():
    with np.load(SAMPLE_MODELS / "fashion_mnist_subset.npz") as d:
        return {k: d[k] for k in d.files}


def test_subset_layout(subset):
    assert subset["images"].dtype == np.uint8
    assert subset["images"].shape == (1000, 1, 28, 28)
    assert subset["labels"].dtype == np.int64
    assert subset["labels"].shape == (1000,)
    assert len(subset["classes"]) == 10
    # Class-balanced by construction: 100 images per class.
    assert np.bincount(subset["labels"], minlength=10).tolist() == [100] * 10


@pytest.mark.parametrize("stem", MODELS)
def test_sha256_matches_manifest(stem):
    entry = MANIFEST["models"][stem]
    digest = hashlib.sha256((SAMPLE_MODELS / entry["file"]).read_bytes()).hexdigest()
    assert digest == entry["sha256"]


@pytest.mark.parametrize("stem", MODELS)
def test_model_is_valid(stem):
    entry = MANIFEST["models"][stem]
    path = SAMPLE_MODELS / entry["file"]
    assert path.stat().st_size < 5 * 1024 * 1024
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [entry["input"]["name"]]
    assert [o.name for o in model.graph.output] == [entry["output"]["name"]]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == entry["conv_nodes"]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique"


@pytest.mark.parametrize("stem", MODELS)
def test_golden_outputs(stem):
    entry = MANIFEST["models"][stem]
    with np.load(SAMPLE_MODELS / "golden" / f"{stem}.npz") as g:
        x, expected = g["input"], g["output"]
    got = _session(entry).run([entry["output"]["name"]], {entry["input"]["name"]: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stem", MODELS)
def test_subset_accuracy(stem, subset):
    entry = MANIFEST["models"][stem]
    x = subset["images"].astype(np.float32)  # raw 0..255, no scaling
    logits = _session(entry).run([entry["output"]["name"]], {entry["input"]["name"]: x})[0]
    assert logits.shape == (len(x), 10)
    acc = float((logits.argmax(1) == subset["labels"]).mean())
    assert acc == pytest.approx(entry["subset_top1"], abs=0.002)
