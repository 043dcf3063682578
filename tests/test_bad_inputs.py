"""Bad input, as a hostile new user would give it: every case ends in a clear error (the CLI: one line
``error: ...`` and exit status 1, or 2 for bad usage) or a correct result; nothing crashes, nothing
existing is clobbered, nothing comes out silently wrong."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import impact, masks, ops
from onnx_perforate.calibration import calibration_set
from onnx_perforate.cli import main
from onnx_perforate.data import PreprocessSpec, check_labels, load_data
from onnx_perforate.graph import load_model, output_path, save_model

from helpers import REPO, SAMPLE_MODELS, needs_library, shared_file

CLASSES = 5


def classifier(batch="N", name="x", seed=0, opset=13) -> onnx.ModelProto:
    """x [batch, 2, 6, 6] -> 3x3 Conv -> Relu -> Flatten -> MatMul -> logits [batch, 5]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(4 * 4 * 4, CLASSES)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", [name, "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CLASSES])], [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(classifier(), path)
    return path


def npz(path, n=12, labels="good", **extra):
    rng = np.random.default_rng(1)
    arrays = dict(images=rng.normal(size=(n, 2, 6, 6)).astype(np.float32))
    if isinstance(labels, str):
        arrays["labels"] = rng.integers(0, CLASSES, n)
    elif labels is not None:
        arrays["labels"] = labels
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def fails(argv, capsys, status=1, *words):
    """Run the CLI; it must exit with ``status`` and print one error line naming ``words``."""
    if status == 2:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
    else:
        assert main(argv) == status
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith(f"onnx-perforate {argv[0]}: error: "), err
        assert "Traceback" not in err
        assert "unexpected" not in lines[0], lines[0]  # a foreseen case gets its own message
    for word in words:
        assert word in err, (word, err)
    return err


# ------------------------------------------------------------------------------------------------
# Models that are not models


def corrupted(tmp_path) -> dict:
    good = classifier().SerializeToString()
    files = {
        "truncated": good[: len(good) // 2],
        "renamed": good.replace(b"relu", b"\xff\xfe\xfd\xfc", 1),  # invalid UTF-8 in a name
        "dangling": good.replace(b"\n\x01c", b"\n\x01q", 1),  # a node reads a tensor nobody makes
        "empty": b"",
        "text": b"this is not a model\n",
    }
    paths = {}
    for kind, data in files.items():
        paths[kind] = tmp_path / f"{kind}.onnx"
        paths[kind].write_bytes(data)
    return paths


@pytest.mark.parametrize("command", ["inspect", "perforate", "bench", "eval", "tune"])
def test_corrupted_models_are_refused_by_every_command(command, tmp_path, capsys):
    data = npz(tmp_path / "d.npz")
    extra = {"inspect": [], "perforate": ["--rate", "0.5", "-o", str(tmp_path / "o.onnx")], "bench": ["--repeats", "1"],
             "eval": ["--data", str(data)], "tune": ["--data", str(data), "-o", str(tmp_path / "t"),
                                                     "--target-speedup", "2"]}[command]
    for kind, path in corrupted(tmp_path).items():
        err = fails([command, str(path), *extra, "--no-progress"], capsys)
        assert str(path) in err
        if kind == "empty":
            assert "is empty" in err
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "t").exists()


def test_a_directory_is_not_a_missing_file(tmp_path, capsys):
    fails(["inspect", str(tmp_path)], capsys, 1, "is a directory")
    fails(["inspect", str(tmp_path / "nope.onnx")], capsys, 1, "does not exist")


def test_missing_external_data_is_named(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(classifier(), path, external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    assert load_model(path).graph.initializer[0].raw_data  # loads with its data
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(onnx_perforate.PerforateError, match="external data.*m.onnx.data"):
        load_model(path)


def test_external_data_written_into_the_working_directory(tmp_path, monkeypatch, capsys):
    """onnx looks for an existing external data file in the working directory: writing beside it failed
    ('External data file exists'), the CLI's --external-data with it."""
    monkeypatch.chdir(tmp_path)
    onnx.save(classifier(), "model.onnx")
    assert main(["perforate", "model.onnx", "--rate", "0.5", "-o", "p.onnx", "--external-data"]) == 0, \
        capsys.readouterr().err
    assert Path("p.onnx.data").stat().st_size > 1024 and load_model("p.onnx").graph.node
    small = classifier()
    del small.graph.initializer[1]  # no tensor above onnx's 1 KiB threshold: the data file is empty
    small.graph.input.append(helper.make_tensor_value_info("fc", TensorProto.FLOAT, [64, CLASSES]))
    save_model(small, "small.onnx", external_data=True)
    assert Path("small.onnx.data").stat().st_size == 0 and load_model("small.onnx").graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "p.json", "p.onnx", "p.onnx.data",
                                                          "small.onnx", "small.onnx.data"]


def test_an_invalid_input_model_is_not_called_an_internal_error():
    model = classifier()
    model.graph.node[1].input[0] = "nobody_makes_this"
    with pytest.raises(onnx_perforate.PerforateError, match="not a valid ONNX model") as info:
        onnx_perforate.rewrite(model, {"conv": np.ones((4, 4), bool)})
    assert "internal error" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# Options: every number is checked, with the valid range in the message


@pytest.mark.parametrize("argv, words", [
    (["bench", "M", "--repeats", "0"], [">= 1"]),
    (["bench", "M", "--batch", "-1"], [">= 1"]),
    (["bench", "M", "--threads", "-1"], ["[1, "]),
    (["bench", "M", "--threads", "100000"], ["[1, "]),
    (["eval", "M", "--data", "D", "--threads", "2.5"], ["integer"]),
    (["bench", "M", "--warmup", "-2"], [">= 0"]),
    (["eval", "M", "--data", "D", "--batch", "0"], [">= 1"]),
    (["eval", "M", "--data", "D", "--limit", "-5"], [">= 1"]),
    (["eval", "M", "--data", "D", "--std", "0"], ["> 0"]),
    (["eval", "M", "--data", "D", "--std", "1,nan"], ["> 0"]),
    (["eval", "M", "--data", "D", "--size", "2.5"], ["integer"]),
    (["eval", "M", "--data", "D", "--scale", "inf"], ["finite"]),
    (["perforate", "M", "-o", "O", "--rate", "1.5"], ["[0, 1)"]),
    (["perforate", "M", "-o", "O", "--rate", "nan"], ["[0, 1)"]),
    (["perforate", "M", "-o", "O", "--rate", "0.5", "--seed", "-1"], [">= 0"]),
    (["perforate", "M", "-o", "O", "--rate", "0.5", "--kernel", "0x3"], ["positive"]),
    (["tune", "M", "--data", "D", "-o", "O", "--ladder", "0.2,1.5"], ["[0, 1)"]),
    (["tune", "M", "--data", "D", "-o", "O", "--target-speedup", "0"], ["> 1"]),
    (["tune", "M", "--data", "D", "-o", "O", "--target-speedup", "nan"], ["> 1"]),
    (["tune", "M", "--data", "D", "-o", "O", "--max-accuracy-drop", "-0.1"], ["[0, 1]"]),
    (["tune", "M", "--data", "D", "-o", "O", "--subset-size", "0"], [">= 1"]),
    (["finetune", "M", "--original", "M", "--data", "D", "-o", "O", "--holdout", "1"], ["(0, 1)"]),
    (["finetune", "M", "--original", "M", "--data", "D", "-o", "O", "--lr=-1e-3"], ["> 0"]),
    (["finetune", "M", "--original", "M", "--data", "D", "-o", "O", "--epochs", "0"], [">= 1"]),
])
def test_numeric_options_are_checked_by_the_parser(argv, words, capsys):
    fails(argv, capsys, 2, *words)


@pytest.mark.parametrize("call, words", [
    (lambda m, d: onnx_perforate.tune(m, d, target_speedup=0), "target_speedup"),
    (lambda m, d: onnx_perforate.tune(m, d, target_speedup=float("nan")), "target_speedup"),
    (lambda m, d: onnx_perforate.tune(m, d, ladder=(0.2, 1.5)), "ladder rate"),
    (lambda m, d: onnx_perforate.tune(m, d, ladder="0.5"), "ladder"),
    (lambda m, d: onnx_perforate.tune(m, d, repeats=0), "repeats"),
    (lambda m, d: onnx_perforate.tune(m, d, batch_size=-1), "batch_size"),
    (lambda m, d: onnx_perforate.tune(m, d, threads=-1), "threads"),
    (lambda m, d: onnx_perforate.tune(m, d, subset_size=0), "subset_size"),
    (lambda m, d: onnx_perforate.tune(m, d, max_accuracy_drop=2), "max_accuracy_drop"),
    (lambda m, d: onnx_perforate.tune(m, d, mask_kind="best"), "mask_kind"),
    (lambda m, d: PreprocessSpec(std=(0.0,)), "std"),
    (lambda m, d: PreprocessSpec(size=-3), "size"),
    (lambda m, d: load_data(d, limit=-1), "limit"),
    (lambda m, d: onnx_perforate.session_options(-1), "intra_op_num_threads"),
    (lambda m, d: onnx_perforate.session_options(100_000), "intra_op_num_threads"),
    (lambda m, d: masks.uniform((4, 4), float("nan")), "rate"),
    (lambda m, d: masks.grid((4, 4), 1.5), "rate"),
    (lambda m, d: masks.grid((4.5, 4), 0.5), "mask size"),
    (lambda m, d: masks.uniform((4, 4), 0.5, seed=-1), "seed"),
    (lambda m, d: masks.uniform((4, 4), 0.5, seed="a"), "seed"),
    (lambda m, d: impact.impact(m, d, 1.0), "rate"),
    (lambda m, d: impact.impact(m, d, {"conv": 2}), "the rate of 'conv'"),
    (lambda m, d: impact.impact(m, d, 0.5, steps=0), "steps"),
    (lambda m, d: calibration_set(m, d, subset_size=0), "subset_size"),
])
def test_numeric_arguments_are_checked_by_the_api(call, words, tmp_path):
    with pytest.raises(onnx_perforate.PerforateError, match=words):
        call(classifier(), npz(tmp_path / "d.npz"))


# ------------------------------------------------------------------------------------------------
# Data and labels


@pytest.mark.parametrize("labels, words", [
    (np.eye(CLASSES, dtype=np.int64)[np.arange(12) % CLASSES], "one-hot"),
    (np.full(12, -1), "negative"),
    (np.full(12, 99), "99"),
    (np.arange(12).astype(np.float32), "integer"),
    (np.array(["cat"] * 12), "integer"),
])
def test_labels_must_be_class_indices(labels, words, tmp_path, model_path, capsys, require_library):
    data = npz(tmp_path / "d.npz", labels=labels)
    fails(["eval", str(model_path), "--data", str(data), "--no-progress"], capsys, 1, words)
    fails(["tune", str(model_path), "--data", str(data), "-o", str(tmp_path / "t"), "--target-speedup", "2",
           "--no-progress"], capsys, 1, words)
    x = np.random.default_rng(0).normal(size=(12, 2, 6, 6)).astype(np.float32)
    with pytest.raises(onnx_perforate.DataError, match=words):
        onnx_perforate.tune(classifier(), [({"x": x}, labels)], target_speedup=2, progress=False)
    with pytest.raises(onnx_perforate.DataError, match=words):  # 99: was an ORT error in the gradient graph
        impact.impact(classifier(), [({"x": x}, labels)], 0.5)


def test_check_labels_accepts_exactly_class_indices():
    assert check_labels(np.array([0, 4, 2], np.uint8), classes=5).dtype == np.int64
    for bad in ([[0, 1]], [0.0, 1.0], [True, False], [-1], [5]):
        with pytest.raises(onnx_perforate.DataError):
            check_labels(np.array(bad), classes=5)


def test_unreadable_npz_files(tmp_path, model_path, capsys):
    (tmp_path / "zip.npz").write_text("not a zip file")
    fails(["eval", str(model_path), "--data", str(tmp_path / "zip.npz")], capsys, 1, "cannot read")
    np.savez(tmp_path / "obj.npz", images=np.zeros((2, 2, 6, 6), np.float32), labels=np.array([1, "a"], dtype=object))
    fails(["eval", str(model_path), "--data", str(tmp_path / "obj.npz")], capsys, 1, "obj.npz")
    np.savez(tmp_path / "str.npz", images=np.array([["a"]]))
    fails(["eval", str(model_path), "--data", str(tmp_path / "str.npz")], capsys, 1, "expected numbers")
    with pytest.raises(onnx_perforate.DataError, match="not numeric"):
        calibration_set(classifier(), [{"x": np.array([["a"]])}])


@pytest.mark.parametrize("images, labels, words", [
    (np.full((12, 2, 6, 6), np.nan, np.float32), "good", ["input 0 holds nan", "finite"]),
    (np.where(np.arange(12 * 72).reshape(12, 2, 6, 6) == 2 * 72 + 7, np.inf, 0.5), "good",
     ["input 2 holds inf at index [0, 1, 1]"]),
    (np.zeros((0, 2, 6, 6), np.float32), np.zeros(0, np.int64), ["shape [0, 2, 6, 6]", "N >= 1"]),
    (np.float32(3), None, ["shape []", "N >= 1"]),
    (np.zeros((12, 2, 6, 6), np.float32), np.arange(24) % CLASSES, ["24 labels", "12 inputs"]),
    (np.zeros((12, 2, 6, 6), np.float32), np.arange(5) % CLASSES, ["5 labels", "12 inputs"]),
])
def test_inputs_that_would_give_a_meaningless_answer(images, labels, words, tmp_path, model_path, capsys):
    data = npz(tmp_path / "d.npz", labels=labels, images=images)
    fails(["eval", str(model_path), "--data", str(data), "--no-progress"], capsys, 1, "d.npz", *words)
    fails(["eval", str(model_path), "--data", str(data), "--limit", "3", "--no-progress"], capsys, 1, *words[:1])


@pytest.mark.parametrize("data, words", [
    (None, "calibration data is a NoneType"),
    (5, "calibration data is a int"),
    ([{"x": np.zeros((4, 2, 5, 6), np.float32)}], "shape [4, 2, 5, 6], expected [N, 2, 6, 6] (the model input)"),
    ([{"x": np.zeros((4, 6, 6), np.float32)}], "shape [4, 6, 6]"),
    ([{"x": np.zeros((4, 2, 6, 6), np.float32)}, {"x": np.zeros((4, 2, 6), np.float32)}], "shape [4, 2, 6]"),
])
def test_calibration_data_of_the_wrong_kind_or_shape(data, words):
    with pytest.raises(onnx_perforate.DataError) as info:
        calibration_set(classifier(), data)
    assert words in str(info.value)


def test_calibration_data_of_the_wrong_shape_for_a_dynamic_model():
    model = classifier()
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"
    with pytest.raises(onnx_perforate.DataError, match=r"shape \[1, 2, 7, 7\], expected \[N, 2, 6, 6\] like"):
        calibration_set(model, [{"x": np.zeros((3, 2, 6, 6), np.float32)}, {"x": np.zeros((1, 2, 7, 7), np.float32)}])


def test_a_calibration_data_reader_without_the_input():
    class Reader:  # onnxruntime.quantization.CalibrationDataReader's protocol
        def __init__(self):
            self.items = [{"image": np.zeros((2, 2, 6, 6), np.float32)}]

        def get_next(self):
            return self.items.pop() if self.items else None

    with pytest.raises(onnx_perforate.DataError, match=r"CalibrationDataReader gave inputs \['image'\].*'x'"):
        calibration_set(classifier(), Reader())


def test_unknown_finetune_options_are_refused_before_the_search(tmp_path, model_path, capsys):
    fails(["tune", str(model_path), "--data", str(npz(tmp_path / "d.npz")), "-o", str(tmp_path / "t"),
           "--target-speedup", "2", "--finetune", "epochs=2,learning-rate=1e-3,bogus=1", "--no-progress"], capsys, 1,
          "--finetune: unknown option 'bogus'", "learning_rate")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("content", [b"not a zip", None, "other archive"])
def test_a_file_that_is_not_a_finetune_checkpoint(content, tmp_path, require_library):
    model = classifier()
    mask = np.ones((4, 4), bool)
    mask[::2, ::2] = False
    checkpoint = tmp_path / "ck.npz"
    if content is None:
        np.savez(checkpoint, meta=np.array([object()], dtype=object))
    elif content == "other archive":
        np.savez(checkpoint, images=np.zeros(3))
    else:
        checkpoint.write_bytes(content)
    x = np.random.default_rng(0).normal(size=(10, 2, 6, 6)).astype(np.float32)
    with pytest.raises(onnx_perforate.PerforateError, match="ck.npz is not a complete finetune checkpoint"):
        onnx_perforate.finetune(onnx_perforate.rewrite(model, {"conv": mask}), model, [{"x": x}], method="distill",
                                epochs=1, batch_size=8, checkpoint=checkpoint, progress=False)


def test_calibration_inputs_must_be_finite():
    x = np.zeros((4, 2, 6, 6), np.float32)
    bad = x.copy()
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(onnx_perforate.DataError, match=r"calibration input 'x': input 5 holds nan at index \[0, 2, 3\]"):
        calibration_set(classifier(), [{"x": x}, {"x": bad}])


def test_a_model_input_that_is_not_float_is_named(tmp_path, capsys):
    model = classifier()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x_float"], to=TensorProto.FLOAT))
    model.graph.node[1].input[0] = "x_float"
    onnx.save(model, tmp_path / "int.onnx")
    for argv in (["eval", str(tmp_path / "int.onnx"), "--data", str(npz(tmp_path / "d.npz"))],
                 ["bench", str(tmp_path / "int.onnx"), "--repeats", "1", "--no-memory"]):
        fails(argv, capsys, 1, "input 'x'", "INT64", "float32")


def test_nothing_to_perforate_says_why(tmp_path, capsys):
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])])
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "relu.onnx")
    dynamic = classifier()
    for dim in dynamic.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"
    del dynamic.graph.node[2:]
    dynamic.graph.output[0].CopyFrom(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    del dynamic.graph.initializer[1]
    onnx.save(dynamic, tmp_path / "dynamic.onnx")
    out = ["-o", str(tmp_path / "p.onnx"), "--rate", "0.5"]
    fails(["perforate", str(tmp_path / "relu.onnx"), *out], capsys, 1, "has no convolution")
    fails(["perforate", str(tmp_path / "dynamic.onnx"), *out], capsys, 1, "Conv 'conv'", "not static")
    fails(["perforate", str(tmp_path / "dynamic.onnx"), *out, "--layers", "co*"], capsys, 1, "not static")
    fails(["perforate", str(tmp_path / "relu.onnx"), *out, "--kernel", "5x5"], capsys, 1, "has no convolution")
    onnx.save(classifier(), tmp_path / "m.onnx")
    fails(["perforate", str(tmp_path / "m.onnx"), *out, "--kernel", "5x5"], capsys, 1, "--kernel 5x5",
          "perforable kernels: 3x3")


def test_image_folders_that_do_not_fit_the_model(tmp_path, capsys):
    """fashion_cnn takes [N, 1, 28, 28]: images of other sizes, or preprocessing to another size or layout,
    are named before ONNX Runtime (or numpy's stacking) fails on them."""
    from PIL import Image

    model = str(SAMPLE_MODELS / "fashion_cnn.onnx")
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, width in enumerate((28, 28, 30)):
        Image.fromarray(rng.integers(0, 256, (28, width), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "labels.txt").write_text("0.png 1\n1.png 2\n2.png 3\n")
    data = ["--data", str(folder), "--no-progress"]
    fails(["eval", model, *data], capsys, 1, "image", "2.png", "[1, 28, 30]", "[1, 28, 28] (the model input)")
    fails(["eval", model, *data, "--preset", "caffe"], capsys, 1, "0.png", "[1, 224, 224]")
    fails(["eval", model, *data, "--layout", "NHWC"], capsys, 1, "--layout")
    fails(["eval", model, *data, "--mean", "1,2"], capsys, 1, "mean has 2 values", "1 channel")
    assert main(["eval", model, *data, "--size", "28", "--crop", "28", "--no-progress"]) == 0
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    fails(["eval", model, *data, "--labels", str(tmp_path / "binary.txt")], capsys, 1, "cannot read labels file")
    fails(["eval", model, *data, "--labels", str(folder)], capsys, 1, "is a folder")
    arrays = str(npz(tmp_path / "d.npz"))
    fails(["eval", model, "--data", arrays, "--labels", str(folder / "labels.txt")], capsys, 1, "--labels",
          "image folder")
    fails(["eval", model, "--data", arrays, "--preset", "caffe", "--size", "28"], capsys, 1, "--preset --size")


def test_a_model_that_is_not_a_classifier_is_named(tmp_path, capsys, require_library):
    """Its output is a map [N, 4, 4, 4]: an accuracy over flattened maps would mean nothing."""
    model = classifier()
    del model.graph.node[2:]
    del model.graph.initializer[1]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 4, 4]))
    onnx.save(model, tmp_path / "maps.onnx")
    data = str(npz(tmp_path / "d.npz"))
    words = ("shape [", "4, 4, 4]", "expected class scores [N, classes]")
    fails(["eval", str(tmp_path / "maps.onnx"), "--data", data, "--no-progress"], capsys, 1, "maps.onnx", *words)
    fails(["tune", str(tmp_path / "maps.onnx"), "--data", data, "-o", str(tmp_path / "t"), "--target-speedup", "2",
           "--mask-kind", "grid", "--repeats", "1", "--no-progress"], capsys, 1, *words)
    onnx.save(onnx_perforate.rewrite(model, {"conv": np.eye(4, dtype=bool) | np.eye(4, dtype=bool)[::-1]}),
              tmp_path / "p.onnx")
    fails(["finetune", str(tmp_path / "p.onnx"), "--original", str(tmp_path / "maps.onnx"), "--data", data, "-o",
           str(tmp_path / "f.onnx"), "--epochs", "1", "--no-progress"], capsys, 1, *words)


def test_an_op_refusing_its_input_is_one_line_naming_the_node(tmp_path, capfd, require_library):
    """A perforated model whose interpolation index was edited out of range: the kernel's error, once
    (ORT's own log line of it stays off stderr), as a foreseen error, not an 'unexpected' one."""
    mask = np.ones((4, 4), bool)
    mask[::2, ::2] = False
    model = onnx_perforate.rewrite(classifier(), {"conv": mask}, compact=False)
    index = next(t for t in model.graph.initializer if t.data_type == TensorProto.INT64 and len(t.dims) == 2)
    values = numpy_helper.to_array(index).copy()
    values[0, 0] = 10**6
    index.CopyFrom(numpy_helper.from_array(values, index.name))
    onnx.save(model, tmp_path / "edited.onnx")
    assert main(["eval", str(tmp_path / "edited.onnx"), "--data", str(npz(tmp_path / "d.npz")), "--no-progress"]) == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "rror" in line]
    assert len(lines) == 1 and lines[0].startswith("onnx-perforate eval: error: ONNX Runtime: NNInterpolate node"), err
    assert "value 1000000" in lines[0] and "unexpected" not in lines[0]


def test_eval_agreement_ignores_the_rows_that_pad_a_static_batch(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(classifier(batch=16, seed=0), a)
    onnx.save(classifier(batch=16, seed=2), b)
    x = np.random.default_rng(3).normal(size=(17, 2, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=x)
    want = []
    for path in (a, b):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        padded = np.concatenate([x, np.repeat(x[-1:], 15, axis=0)])
        want.append(np.concatenate([session.run(None, {"x": padded[i:i + 16]})[0] for i in (0, 16)])[:17].argmax(1))
    truth = float((want[0] == want[1]).mean())
    assert main(["eval", str(a), "--data", str(tmp_path / "d.npz"), "--compare", str(b), "--json",
                 str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["top1_agreement"] == truth


@needs_library
def test_models_with_different_inputs_are_not_benchmarked_together(tmp_path, model_path, capsys):
    other = tmp_path / "other.onnx"
    onnx.save(classifier(name="image"), other)
    fails(["bench", str(model_path), str(other), "--repeats", "1", "--no-memory"], capsys, 1, "different inputs")


def test_models_with_different_inputs_are_not_compared(tmp_path, model_path, capsys):
    wider = tmp_path / "wider.onnx"
    model = classifier()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"))
    onnx.save(model, wider)
    fails(["eval", str(model_path), "--data", str(npz(tmp_path / "d.npz")), "--compare", str(wider)], capsys, 1,
          "same inputs")


# ------------------------------------------------------------------------------------------------
# Outputs: never replace anything but a regular file, modes from the umask, all or nothing


def test_outputs_never_replace_a_device_fifo_or_directory(tmp_path, model_path, capsys):
    for special in ("/dev/null", "/dev/full", str(tmp_path)):
        with pytest.raises(onnx_perforate.PerforateError, match="refusing"):
            output_path(special)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fails(["perforate", str(model_path), "--rate", "0.5", "-o", str(fifo)], capsys, 1, "FIFO")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    fails(["inspect", str(model_path), "--json", str(fifo)], capsys, 1, "FIFO")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_outputs_write_through_a_symlink(tmp_path, model_path):
    target, link = tmp_path / "real.onnx", tmp_path / "link.onnx"
    target.write_text("old")
    link.symlink_to(target)
    assert main(["perforate", str(model_path), "--rate", "0.5", "-o", str(link), "--summary",
                 str(tmp_path / "s.json")]) == 0
    assert link.is_symlink() and onnx.load(target).graph.node


def test_outputs_get_their_mode_from_the_umask(tmp_path, model_path):
    old = os.umask(0o027)
    try:
        assert main(["perforate", str(model_path), "--rate", "0.5", "-o", str(tmp_path / "p.onnx")]) == 0
    finally:
        os.umask(old)
    for name in ("p.onnx", "p.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


def test_model_and_summary_are_written_both_or_neither(tmp_path, model_path, capsys):
    (tmp_path / "summary_dir").mkdir()
    fails(["perforate", str(model_path), "--rate", "0.5", "-o", str(tmp_path / "p.onnx"), "--summary",
           str(tmp_path / "summary_dir")], capsys, 1, "directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "summary_dir"]


def test_outputs_never_overwrite_an_input(tmp_path, model_path, capsys):
    data = npz(tmp_path / "d.npz")
    (tmp_path / "hard.onnx").hardlink_to(model_path)
    (tmp_path / "perforated.onnx").write_bytes(model_path.read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    m, d = str(model_path), str(data)
    cases = [
        (["perforate", m, "--rate", "0.5", "-o", m], "--output"),
        (["perforate", m, "--rate", "0.5", "-o", str(tmp_path / "q.onnx"), "--summary", m], "--summary"),
        (["perforate", str(tmp_path / "hard.onnx"), "--rate", "0.5", "-o", m], "the input model"),
        (["inspect", m, "--json", m], "--json"),
        (["bench", m, str(tmp_path / "perforated.onnx"), "--json", str(tmp_path / "perforated.onnx")],
         "the perforated model"),
        (["eval", m, "--data", d, "--json", d], "the --data file"),
        (["tune", m, "--data", d, "-o", str(tmp_path), "--target-speedup", "2"], "model.onnx in -o"),
        (["tune", m, "--data", d, "-o", str(tmp_path / "t"), "--target-speedup", "2", "--checkpoint", m],
         "--checkpoint"),
        (["finetune", m, "--original", str(tmp_path / "perforated.onnx"), "--data", d,
          "-o", str(tmp_path / "perforated.onnx")], "the original model"),
        (["finetune", m, "--original", m, "--data", d, "-o", str(tmp_path / "f.onnx"), "--report", d], "--report"),
    ]
    for argv, words in cases:
        fails(argv, capsys, 1, "refusing to write", "would destroy", words)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, model_path, capsys):
    data = str(npz(tmp_path / "d.npz"))
    m = str(model_path)
    fails(["tune", m, "--data", data, "-o", str(tmp_path / "t"), "--target-speedup", "2", "--checkpoint",
           str(tmp_path)], capsys, 1, "--checkpoint: refusing", "directory")
    fails(["perforate", m, "--rate", "0.5", "-o", str(model_path / "p.onnx")], capsys, 1, "is not a folder")
    fails(["tune", m, "--data", data, "-o", m, "--target-speedup", "2"], capsys, 1, "is a file", "folder")
    fails(["perforate", m, "--rate", "0.5", "-o", str(tmp_path / "p.onnx"), "--summary", str(tmp_path / "p.onnx")],
          capsys, 1, "--summary and --output are the same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "model.onnx"]


def test_ctrl_c_while_writing_keeps_the_old_output(tmp_path, model_path, capsys, monkeypatch):
    out = tmp_path / "p.onnx"
    out.write_text("the previous output")

    def interrupted_save(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:100])  # half written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted_save)
    assert main(["perforate", str(model_path), "--rate", "0.5", "-o", str(out)]) == 130
    assert "onnx-perforate perforate: interrupted" in capsys.readouterr().err
    assert out.read_text() == "the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "p.onnx"]  # no summary, no temporary


def test_ctrl_c_between_the_renames_waits_for_both(tmp_path, monkeypatch):
    import signal

    from onnx_perforate.graph import atomic_outputs

    replace = os.replace

    def replace_then_interrupt(source, target):
        replace(source, target)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    # Python's own Ctrl-C handler, as in a terminal: a runner started in the background inherits an
    # ignored SIGINT, which the deferral rightly keeps ignoring.
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_outputs(tmp_path / "model.onnx", tmp_path / "summary.json") as temporaries:
                for temporary in temporaries:
                    temporary.write_text("new")
    finally:
        signal.signal(signal.SIGINT, launched_with)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "summary.json"]


def test_a_failed_write_names_the_output_not_its_temporary_file(tmp_path, model_path, capsys):
    # /proc refuses new files: the error must name the file asked for
    err = fails(["inspect", str(model_path), "--json", "/proc/no_such_dir/records.json"], capsys, 1,
                "/proc/no_such_dir/records.json")
    assert ".tmp" not in err


# ------------------------------------------------------------------------------------------------
# Masks, the tuner's checkpoint


@pytest.mark.parametrize("mask", [np.full((4, 4), np.nan), np.full((4, 4), "yes"), np.full((4, 4), 0.5),
                                  np.array([[object()] * 4] * 4)])
def test_masks_of_nan_strings_or_fractions_are_refused(mask):
    with pytest.raises(onnx_perforate.MaskError, match="booleans"):
        onnx_perforate.rewrite(classifier(), {"conv": mask})


def test_truncated_or_empty_checkpoints_are_refused(tmp_path, model_path, capsys, require_library):
    data = npz(tmp_path / "d.npz")
    for text in ("", '{"identity": {"ladder": [0.0'):
        (tmp_path / "ck.json").write_text(text)
        fails(["tune", str(model_path), "--data", str(data), "-o", str(tmp_path / "t"), "--target-speedup", "5",
               "--checkpoint", str(tmp_path / "ck.json"), "--no-progress", "--mask-kind", "grid",
               "--repeats", "1"], capsys, 1, "not a complete tuner checkpoint")


def test_resume_refuses_a_different_search(tmp_path, require_library):
    x = np.random.default_rng(0).normal(size=(8, 2, 6, 6)).astype(np.float32)
    checkpoint = tmp_path / "ck.json"
    # monotone=False and no accuracy budget: the step (and so the checkpoint) is taken whatever the timings
    options = dict(mask_kind="grid", repeats=1, progress=False, checkpoint=checkpoint, batch_size=4, monotone=False,
                   max_accuracy_drop=1.0)
    onnx_perforate.tune(classifier(), [{"x": x}], ladder=(0.0, 0.5), **options)
    saved = json.loads(checkpoint.read_text())
    assert saved["identity"]["ladder"] == [0.0, 0.5] and len(saved["identity"]["model"]) == 64
    with pytest.raises(onnx_perforate.PerforateError, match=r"changed ladder \(\[0.0, 0.5\] -> \[0.0, 0.3, 0.5\]\)"):
        onnx_perforate.tune(classifier(), [{"x": x}], ladder=(0.0, 0.3, 0.5), **options)
    with pytest.raises(onnx_perforate.PerforateError, match="changed the calibration data"):
        onnx_perforate.tune(classifier(), [{"x": x + 1}], ladder=(0.0, 0.5), **options)
    with pytest.raises(onnx_perforate.PerforateError, match="changed the model"):
        onnx_perforate.tune(classifier(seed=5), [{"x": x}], ladder=(0.0, 0.5), **options)
    with pytest.raises(onnx_perforate.PerforateError, match="subset_size"):
        onnx_perforate.tune(classifier(), [{"x": x}], ladder=(0.0, 0.5), subset_size=4, **options)
    again = onnx_perforate.tune(classifier(), [{"x": x}], ladder=(0.0, 0.5), **options)  # the same search resumes
    assert len(again.steps) == len(saved["steps"])


def test_finetune_with_fewer_held_out_images_than_half_a_batch(tmp_path, require_library):
    """10 images, 2 held out, batch 8: the held-out batch repeats its images to fill the fixed batch."""
    model = classifier()
    mask = np.ones((4, 4), bool)
    mask[::2, ::2] = False
    perforated = onnx_perforate.rewrite(model, {"conv": mask})
    x = np.random.default_rng(0).normal(size=(10, 2, 6, 6)).astype(np.float32)
    result = onnx_perforate.finetune(perforated, model, [{"x": x}], method="distill", epochs=1, batch_size=8,
                                     progress=False)
    assert result.history[0]["agreement"] in (0.0, 0.5, 1.0)  # over the 2 held-out images


def test_tune_takes_one_layer_name_as_a_string(require_library):
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 6)).astype(np.float32)
    result = onnx_perforate.tune(classifier(), [{"x": x}], layers="conv", ladder=(0.0, 0.5), mask_kind="grid",
                                 repeats=1, progress=False, baselines=False)
    assert result.settings["layers"] == ["conv"]  # was refused: cannot tune ['c', 'n', 'o', 'v']


def test_a_batch_larger_than_the_data(require_library):
    x = np.random.default_rng(0).normal(size=(3, 2, 6, 6)).astype(np.float32)
    result = onnx_perforate.tune(classifier(), [{"x": x}], batch_size=4, ladder=(0.0, 0.5), mask_kind="grid",
                                 repeats=1, progress=False)
    assert result.settings["calibration_images"] == 3  # a dynamic batch shrinks to the data
    with pytest.raises(onnx_perforate.PerforateError, match="the model's fixed batch 16 exceeds the 3"):
        onnx_perforate.tune(classifier(batch=16), [{"x": x}], progress=False)


# ------------------------------------------------------------------------------------------------
# onnx.reference fallback: opset-7 Softmax


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset, axis", [(7, None), (11, 1), (11, -3), (13, None), (13, 1)])
def test_reference_softmax_has_the_semantics_of_its_opset(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 2, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 1)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ops.reference_evaluator(model).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-6)


def test_squeezenet_through_onnx_reference_agrees_with_ort():
    """SqueezeNet 1.1 (opset 7) ends in a Softmax over [1, 1000, 1, 1]: with opset 13's semantics
    onnx.reference gave all ones there (argmax 0)."""
    from onnx_perforate.data import PRESETS, load_folder

    model = onnx.load(shared_file("data", "imagenet", "squeezenet1.1.onnx"))
    x = load_folder(shared_file("data", "imagenet", "val100"), PRESETS["caffe"], limit=1).load(0, 1)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
    got = ops.reference_evaluator(model).run(None, {"data_0": x})[0]
    assert got.argmax() == want.argmax() != 0
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_model_onnx_ad_cannot_differentiate_is_one_error_line(tmp_path, capsys, require_library):
    """Impact masks need gradients; MaxRoiPool has no reverse rule in onnx-ad."""
    rng = np.random.default_rng(0)
    model = classifier()
    del model.graph.node[1:]
    model.graph.node.extend([
        helper.make_node("MaxRoiPool", ["c", "rois"], ["pooled"], pooled_shape=[4, 4], name="roi"),
        helper.make_node("Flatten", ["pooled"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")])
    model.graph.initializer.append(numpy_helper.from_array(np.array([[0, 0, 0, 3, 3]], np.float32), "rois"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "roi.onnx")
    np.savez(tmp_path / "d.npz", images=rng.normal(size=(4, 2, 6, 6)).astype(np.float32))
    fails(["tune", str(tmp_path / "roi.onnx"), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "t"),
           "--target-speedup", "3", "--repeats", "1", "--no-progress"], capsys, 1, "MaxRoiPool 'roi'")


# ------------------------------------------------------------------------------------------------
# The library file


def test_truncated_or_foreign_library_files_are_refused(tmp_path, monkeypatch, require_library, capsys):
    real = Path(onnx_perforate.library_path()).read_bytes()
    cases = {"truncated.so": real[: len(real) // 2], "header_only.so": real[:64], "text.so": b"hello\n" * 100,
             "empty.so": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        monkeypatch.setenv("ONNX_PERFORATE_LIBRARY", str(tmp_path / name))
        with pytest.raises(onnx_perforate.InvalidLibraryError, match=name):
            onnx_perforate.session_options(1)
    fails(["bench", str(SAMPLE_MODELS / "fashion_cnn.onnx"), "--repeats", "1"], capsys, 1, "empty.so")
    # A complete shared library that is not ours: ORT's refusal becomes the package's error.
    import scipy_openblas32

    monkeypatch.setenv("ONNX_PERFORATE_LIBRARY", str(Path(scipy_openblas32.get_lib_dir()) / "libscipy_openblas.so"))
    with pytest.raises(onnx_perforate.InvalidLibraryError, match="cannot register"):
        onnx_perforate.session_options(1)


def test_the_cuda_kernels_binding_checks_its_file_too(tmp_path, require_library):
    from onnx_perforate import cuda_kernels

    (tmp_path / "kernels.so").write_bytes(Path(onnx_perforate.library_path()).read_bytes()[:4096])
    with pytest.raises(onnx_perforate.InvalidLibraryError, match="truncated"):
        cuda_kernels.load(str(tmp_path / "kernels.so"))


def test_a_truncated_library_does_not_kill_the_process(tmp_path, require_library):
    copy = tmp_path / "lib.so"
    copy.write_bytes(Path(onnx_perforate.library_path()).read_bytes()[:200_000])
    code = "import onnx_perforate; onnx_perforate.session_options(1)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, ONNX_PERFORATE_LIBRARY=str(copy)), timeout=120)
    assert out.returncode == 1 and "InvalidLibraryError" in out.stderr and "truncated" in out.stderr


def test_the_source_tree_shadowing_the_package_is_named(tmp_path):
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("not run from a source checkout")
    code = "import onnx_perforate; onnx_perforate.library_path()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "ONNX_PERFORATE_LIBRARY"})
    if (REPO / "onnx_perforate" / "lib").is_dir():
        pytest.skip("the source tree holds a built library")
    assert out.returncode == 1 and "shadows the installed package" in out.stderr


def test_cli_subprocess_prints_one_line(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    for extra, traceback in (([], False), (["--log-level", "DEBUG"], True)):
        out = subprocess.run([sys.executable, "-m", "onnx_perforate", "inspect", str(tmp_path / "empty.onnx"), *extra],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.strip().splitlines()[-1].startswith("onnx-perforate inspect: error: ")
        assert ("Traceback" in out.stderr) == traceback
