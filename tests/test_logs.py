"""Quiet, useful logs: the package's ORT sessions log errors only unless the debug switch is on, and a
progress bar that does not write to a terminal writes a few whole lines."""

from __future__ import annotations

import io

import numpy as np
import pytest

import onnx_perforate
from helpers import SAMPLE_MODELS, SHARED_DATA, SQUEEZENET
from onnx_perforate.impact import impact
from onnx_perforate.cli import main
from onnx_perforate.progress import LineProgress, progress

VAL100 = SHARED_DATA / "imagenet" / "val100"
ORT_WARNING = "[W:onnxruntime"


@pytest.fixture
def ort_warnings_restored():
    yield
    onnx_perforate.show_ort_warnings(False)


@pytest.mark.shared
@pytest.mark.skipif(not (SQUEEZENET.is_file() and VAL100.is_dir()), reason="../shared SqueezeNet 1.1 or val100 is absent")
def test_calibrating_squeezenet_prints_no_ort_warning(capfd, ort_warnings_restored):
    from onnx_perforate.data import PRESETS, load_folder

    data = load_folder(VAL100, PRESETS["caffe"], limit=4)
    # The KL loss leaves an initializer of the loss head unused, which ORT warns about when it may.
    chosen = impact(SQUEEZENET, data, 0.5, steps=2, loss="kl", batch_size=2)
    assert len(chosen) == 9
    captured = capfd.readouterr()
    assert ORT_WARNING not in captured.err + captured.out

    onnx_perforate.show_ort_warnings()  # the debug switch brings them back
    impact(SQUEEZENET, data, 0.5, loss="kl", batch_size=4)
    captured = capfd.readouterr()
    assert ORT_WARNING in captured.err + captured.out


def test_session_options_log_errors_only_unless_asked(ort_warnings_restored):
    assert onnx_perforate.session_options(1).log_severity_level == 3
    onnx_perforate.show_ort_warnings()
    assert onnx_perforate.session_options(1).log_severity_level == 2


def test_cli_debug_level_turns_ort_warnings_on(tmp_path, ort_warnings_restored):
    model = SAMPLE_MODELS / "fashion_cnn.onnx"
    main(["inspect", str(model), "--log-level", "DEBUG"])
    assert onnx_perforate.session_options(1).log_severity_level == 2


def test_progress_off_a_terminal_writes_a_few_lines():
    out = io.StringIO()
    bar = progress(range(1000), desc="work", file=out)
    assert isinstance(bar, LineProgress)
    assert sum(1 for _ in bar) == 1000
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[0].startswith("work: 100/1000 it (10%)") and lines[-1].startswith("work: 1000/1000 it (100%)")


def test_progress_stopped_early_says_so():
    out = io.StringIO()
    with progress(desc="tune", total=40, unit="step", file=out) as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(speedup="1.20x")
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("tune: 3/40 step (7%) in ") and out.getvalue().rstrip().endswith("speedup=1.20x done")


def test_cli_eval_progress_in_a_log(tmp_path, capsys):
    data = np.load(SAMPLE_MODELS / "fashion_mnist_subset.npz")
    npz = tmp_path / "data.npz"
    np.savez(npz, images=data["images"][:160].astype(np.float32), labels=data["labels"][:160])
    assert main(["eval", str(SAMPLE_MODELS / "fashion_cnn.onnx"), "--data", str(npz), "--batch", "4"]) == 0
    err = capsys.readouterr().err
    progress_lines = [line for line in err.splitlines() if line.startswith("eval:")]
    assert "\r" not in err and 1 <= len(progress_lines) <= 10, err


def test_progress_line_shows_the_result_set_after_the_step():
    out = io.StringIO()
    bar = progress(desc="tune", total=10, unit="step", file=out)
    for step in range(4):
        bar.set_postfix_str(f"trying conv{step}")
        bar.update(1)
        bar.set_postfix(speedup=f"1.{step}x")  # the tuner reports the step once it is counted
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines[:4]] == [f"tune: {k}/10 step ({k}0%)" for k in range(1, 5)]
    assert [line.rsplit(", ", 1)[1] for line in lines[:4]] == [f"speedup=1.{k}x" for k in range(4)]
    assert len(lines) == 4  # the last step was written already: closing adds nothing
