"""The command-line tool end to end on small models (and on the bundled sample model when present)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_perforate.cli import main

from helpers import REPO, bn, conv_model, needs_library, sample_file, unary


def _classifier():
    """x [N,3,12,12] -> Conv+BN+Relu -> MaxPool -> logits [N, 8*6*6] (a stand-in classifier)."""
    def flatten(prev):
        return [onnx.helper.make_node("Flatten", [prev], ["flat"], name="flatten")], [], "flat"
    return conv_model(after=[bn, unary("Relu"), unary("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), flatten])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_classifier(), path)
    return path


def _npz(tmp_path, n=10, classes=288):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.normal(size=(n, 12, 12, 3)).astype(np.float32), labels=rng.integers(0, classes, n))
    return path


def test_help_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "onnx_perforate", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for word in ("inspect", "perforate", "bench", "eval", "--log-level"):
        assert word in out.stdout
    assert subprocess.run([sys.executable, "-m", "onnx_perforate", "perforate"], capture_output=True,
                          cwd=REPO).returncode == 2


def test_inspect(model_path, tmp_path, capsys):
    assert main(["inspect", str(model_path), "--json", str(tmp_path / "i.json")]) == 0
    assert "conv" in capsys.readouterr().out
    assert json.loads((tmp_path / "i.json").read_text())[0]["name"] == "conv"


@pytest.mark.parametrize("kind", ["uniform", "grid", "pooling"])
def test_perforate_writes_model_and_summary(model_path, tmp_path, kind, caplog):
    out = tmp_path / "out" / "p.onnx"
    with caplog.at_level("INFO"):
        assert main(["perforate", str(model_path), "--mask", kind, "--rate", "0.5", "-o", str(out)]) == 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    summary = json.loads(out.with_suffix(".json").read_text())
    (layer,) = summary["layers"]
    assert layer["mask"]["kind"] == kind and layer["mask"]["rate"] == 0.5
    assert summary["conv_mac_reduction"] == pytest.approx(2.0, rel=0.05)
    assert "folded BatchNormalization" in caplog.text  # the report is logged at INFO


def test_perforate_options_and_errors(model_path, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["perforate", str(model_path), "--rate", "0.3", "--layers", "co*", "--kernel", "3x3",
                 "--no-fuse", "--summary", str(tmp_path / "s.json"), "-o", str(out)]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["layers"][0]["skipped"]["fold_batchnorm"] == "turned off"
    assert main(["perforate", str(model_path), "--rate", "0.3", "--layers", "nope", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 1
    with pytest.raises(SystemExit):
        main(["perforate", str(model_path), "--rate", "1.5", "-o", str(out)])


def test_eval_with_npz_and_compare(model_path, tmp_path, capsys):
    perforated = tmp_path / "p.onnx"
    assert main(["perforate", str(model_path), "--rate", "0.0", "-o", str(perforated)]) == 0
    result = tmp_path / "e.json"
    assert main(["eval", str(perforated), "--data", str(_npz(tmp_path)), "--compare", str(model_path),
                 "--batch", "4", "--json", str(result), "--no-progress"]) == 0
    data = json.loads(result.read_text())
    assert data["top1_agreement"] == 1.0 and data["model_top1"] == data["compare_top1"]
    assert data["count"] == 10 and "model_top5" in data


@needs_library
def test_bench(model_path, tmp_path, capsys):
    perforated = tmp_path / "p.onnx"
    assert main(["perforate", str(model_path), "--rate", "0.5", "-o", str(perforated)]) == 0
    assert main(["bench", str(model_path), str(perforated), "--repeats", "3", "--warmup", "1", "--batch", "2",
                 "--json", str(tmp_path / "b.json"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["speedup"] > 0 and len(data["models"]) == 2 and data["batch"] == 2
    assert "speedup" in capsys.readouterr().out


@pytest.fixture
def perforated_sample(tmp_path):
    """The bundled Fashion-MNIST CNN and its grid-perforated copy written by the CLI."""
    model = sample_file("fashion_cnn.onnx")
    out = tmp_path / "fashion_p.onnx"
    assert main(["perforate", str(model), "--mask", "grid", "--rate", "0.5", "-o", str(out)]) == 0
    return model, out


def test_end_to_end_on_sample_model(perforated_sample, tmp_path):
    model, out = perforated_sample
    result = tmp_path / "e.json"
    assert main(["eval", str(out), "--data", str(sample_file("fashion_mnist_subset.npz")), "--compare", str(model),
                 "--limit", "200", "--json", str(result), "--no-progress"]) == 0
    data = json.loads(result.read_text())
    assert 0 <= data["model_top1"] <= 1 and data["top1_agreement"] > 0.3


def test_perforate_skip_unprofitable(tmp_path):
    """--skip-unprofitable keeps light layers as plain Conv and says why; the summary lists the layout
    reorders ORT is expected to add."""
    model, out = sample_file("fashion_cnn.onnx"), tmp_path / "light.onnx"
    args = ["perforate", str(model), "--mask", "uniform", "--rate", "0.1", "--layers", "conv2", "-o", str(out)]
    assert main(args) == 0
    plain = json.loads(out.with_suffix(".json").read_text())
    assert not plain["kept_plain"] and len(plain["nchwc_reorders"]) > plain["nchwc_reorders_original"]
    assert main(args + ["--skip-unprofitable"]) == 0
    skipped = json.loads(out.with_suffix(".json").read_text())
    assert "conv2" in skipped["kept_plain"] and skipped["conv_mac_reduction"] == 1.0


@needs_library
def test_bench_on_sample_model(perforated_sample, tmp_path):
    model, out = perforated_sample
    assert main(["bench", str(model), str(out), "--repeats", "3", "--no-progress", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["speedup"] > 0
    assert main(["bench", str(model), str(out), "--repeats", "4", "--runs-per-turn", "3", "--no-memory", "--no-progress",
                 "--json", str(tmp_path / "s.json")]) == 0
    steady = json.loads((tmp_path / "s.json").read_text())
    assert steady["runs_per_turn"] == 3 and steady["speedup"] > 0
