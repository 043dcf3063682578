"""Property tests of the CLI and the Python API, with one rule: any input gives a clear error (the
package's own error type; on the command line one `error:` line and status 1 or 2) or a correct result.
Few examples each, to stay fast."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import masks, validation
from onnx_perforate.cli import build_parser, main
from onnx_perforate.data import check_labels

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Option texts a user might type: numbers of every kind, and garbage.
option_texts = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "0", "-0", "1e309", "0x10", "1_000", " 3", "", "1,2", "abc", "2.0"]),
    st.text(max_size=6),
)

# Option -> (command prefix, accepted when the parsed value satisfies this).
NUMERIC_OPTIONS = {
    "--repeats": (["bench", "m"], lambda v: isinstance(v, int) and v >= 1),
    "--warmup": (["bench", "m"], lambda v: isinstance(v, int) and v >= 0),
    "--threads": (["bench", "m"], lambda v: isinstance(v, int) and v >= 1),
    "--batch": (["eval", "m", "--data", "d"], lambda v: isinstance(v, int) and v >= 1),
    "--limit": (["eval", "m", "--data", "d"], lambda v: isinstance(v, int) and v >= 1),
    "--scale": (["eval", "m", "--data", "d"], lambda v: math.isfinite(v) and v > 0),
    "--std": (["eval", "m", "--data", "d"], lambda v: all(math.isfinite(s) and s > 0 for s in v)),
    "--rate": (["perforate", "m", "-o", "o"], lambda v: math.isfinite(v) and 0 <= v < 1),
    "--seed": (["perforate", "m", "-o", "o", "--rate", "0.5"], lambda v: isinstance(v, int) and v >= 0),
    "--target-speedup": (["tune", "m", "--data", "d", "-o", "o"], lambda v: math.isfinite(v) and v > 1),
    "--max-accuracy-drop": (["tune", "m", "--data", "d", "-o", "o"], lambda v: 0 <= v <= 1),
    "--ladder": (["tune", "m", "--data", "d", "-o", "o"], lambda v: v and all(0 <= r < 1 for r in v)),
    "--subset-size": (["tune", "m", "--data", "d", "-o", "o"], lambda v: isinstance(v, int) and v >= 1),
}


@FAST
@given(st.sampled_from(sorted(NUMERIC_OPTIONS)), option_texts)
def test_numeric_options_are_in_range_or_refused(option, text):
    prefix, valid = NUMERIC_OPTIONS[option]
    argv = prefix + [f"{option}={text}"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        return
    value = getattr(args, option.lstrip("-").replace("-", "_"))
    assert valid(value), (option, text, value)


@FAST
@given(st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                 st.booleans(), st.none()))
def test_integer_and_real_checks(value):
    try:
        number = validation.integer(value, "n", minimum=1)
        assert isinstance(number, int) and number >= 1 and number == value and not isinstance(value, bool)
    except onnx_perforate.SettingError as exc:
        assert "n must be an integer >= 1" in str(exc)
    try:
        number = validation.real(value, "x", minimum=0.0, maximum=1.0, exclusive_maximum=True)
        assert math.isfinite(number) and 0 <= number < 1
    except onnx_perforate.SettingError as exc:
        assert "x must be a finite number in [0, 1)" in str(exc)


@FAST
@given(st.tuples(st.integers(-2, 9), st.integers(-2, 9)), st.floats(allow_nan=True, allow_infinity=True),
       st.sampled_from(["uniform", "grid"]), st.integers(0, 2**32))
def test_masks_are_correct_or_refused(shape, rate, kind, seed):
    try:
        mask = masks.uniform(shape, rate, seed=seed) if kind == "uniform" else masks.grid(shape, rate)
    except onnx_perforate.MaskError:
        assert min(shape) <= 0 or not (0 <= rate < 1)
        return
    assert min(shape) > 0 and 0 <= rate < 1
    assert mask.shape == shape and mask.computed >= 1
    if kind == "uniform":
        assert mask.computed == masks.computed_count(shape, rate)


@FAST
@given(st.one_of(
    st.lists(st.integers(-3, 12), max_size=8).map(np.array),
    st.lists(st.floats(allow_nan=True), max_size=5).map(lambda v: np.array(v, dtype=np.float64)),
    st.lists(st.lists(st.integers(0, 1), min_size=2, max_size=2), min_size=1, max_size=4).map(np.array),
    st.lists(st.text(max_size=2), max_size=4).map(np.array),
))
def test_labels_are_class_indices_or_refused(labels):
    try:
        checked = check_labels(labels, classes=10)
    except onnx_perforate.DataError:
        ok = labels.dtype.kind in "iu" and labels.ndim == 1 and (labels.size == 0 or (labels.min() >= 0 and labels.max() < 10))
        assert not ok
        return
    assert checked.dtype == np.int64 and checked.ndim == 1 and np.array_equal(checked, labels)
    assert checked.size == 0 or (checked.min() >= 0 and checked.max() < 10)


@FAST
@given(st.one_of(
    st.lists(st.lists(st.sampled_from([0, 1, 0.0, 1.0, True, False, 2, -1, 0.5, float("nan")]), min_size=4,
                      max_size=4), min_size=4, max_size=4).map(np.array),
    st.lists(st.lists(st.text(max_size=1), min_size=4, max_size=4), min_size=4, max_size=4).map(np.array),
))
def test_rewrite_takes_a_boolean_mask_or_refuses_it(array):
    model = _one_conv()
    try:
        result = onnx_perforate.rewrite(model, {"conv": array})
    except onnx_perforate.PerforateError:
        valid = array.dtype.kind in "biuf" and np.isin(array, (0, 1)).all() and array.astype(bool).any()
        assert not valid
        return
    stored = next(numpy_helper.to_array(t) for t in result.graph.initializer if t.name.endswith("mask"))
    assert np.array_equal(stored, array.astype(bool))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=option_texts, kind=st.sampled_from(["uniform", "grid", "pooling", "best"]),
       layers=st.sampled_from([None, "conv", "c*", "nope"]))
def test_perforate_command_writes_a_valid_model_or_one_error_line(tmp_path_factory, capsys, rate, kind, layers):
    folder = tmp_path_factory.mktemp("p")
    onnx.save(_one_conv(), folder / "m.onnx")
    argv = ["perforate", str(folder / "m.onnx"), "-o", str(folder / "out.onnx"), f"--rate={rate}", "--mask", kind]
    argv += ["--layers", layers] if layers else []
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    if status == 0:
        onnx.checker.check_model(onnx.load(folder / "out.onnx"))
        assert (folder / "out.json").is_file()
    else:
        assert status in (1, 2) and "Traceback" not in err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
        assert not (folder / "out.onnx").exists() and not (folder / "out.json").exists()


def _one_conv() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 2, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("bad", [0, -1, 1.5, float("nan"), "2", True])
def test_session_threads(bad):
    with pytest.raises(onnx_perforate.SettingError, match="intra_op_num_threads"):
        onnx_perforate.session_options(bad)
