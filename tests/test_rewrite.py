"""rewrite(): invariants (all-ones masks reproduce the model, validity, names), what the passes report,
the odd models people have, and every error path; each pass has its own test file. Models are built
with onnx.helper, a few nodes each."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from onnx_perforate import masks
from onnx_perforate.errors import (
    DynamicShapeError,
    EmptyMaskError,
    MaskShapeError,
    PerforateError,
    UnknownNodeError,
    UnsupportedNodeError,
)
from onnx_perforate.rewrite import rewrite, rewrite_with_report

from helpers import (
    assert_close,
    assert_reproduces,
    assert_valid,
    binary,
    bn,
    build,
    conv_model,
    f32,
    ones_for,
    run_backend,
    run_ort,
    run_reference,
    unary,
    x_for,
)

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------
# Invariants


def test_all_ones_mask_reproduces_and_names_are_kept(backend):
    model = conv_model(after=[unary("Relu")])
    before = model.SerializeToString()
    out = assert_reproduces(model, backend)
    assert model.SerializeToString() == before, "the input model must not be modified"
    nodes = {n.name: n for n in out.graph.node}
    assert nodes["conv"].op_type == "PerforatedConv" and nodes["conv"].domain == onnx_perforate.DOMAIN
    assert nodes["conv/interpolate"].op_type == "NNInterpolate"
    assert list(nodes["conv/interpolate"].output) == ["relu"]
    assert nodes["conv"].output[0] == "c.compact"
    inits = {t.name: t for t in out.graph.initializer}
    assert inits["conv.mask"].data_type == TensorProto.BOOL
    assert inits["conv.nn_index"].data_type == TensorProto.INT64
    assert [o.name for o in out.graph.output] == ["y"] and [i.name for i in out.graph.input] == ["x"]
    domains = [o.domain for o in out.opset_import]
    assert domains.count(onnx_perforate.DOMAIN) == 1 and domains.count("") == 1
    value_info = {vi.name for vi in out.graph.value_info}
    assert {"c.compact", "relu"} <= value_info


def test_rewrite_is_deterministic_and_accepts_a_path(tmp_path):
    model = conv_model(after=[unary("Relu")])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    mask = masks.uniform((12, 12), 0.5, seed=3)
    a = rewrite(model, {"conv": mask})
    b = rewrite(str(path), {"conv": mask.array})
    assert a.SerializeToString() == b.SerializeToString()


def test_perforated_model_agrees_with_the_original_where_computed(backend):
    model = conv_model(after=[bn, unary("Relu"), binary("Add", RNG.normal(size=(8, 1, 1)))])
    out = rewrite(model, {"conv": masks.grid((12, 12), 0.6)})
    assert_valid(out)
    x = x_for(model)
    got = run_backend(backend, out, x)[0]
    # Perforation changes the result, but only at skipped positions.
    mask = numpy_helper.to_array({t.name: t for t in out.graph.initializer}["conv.mask"])
    original = run_ort(model, x, library=False)[0]
    assert_close(got[:, :, mask], original[:, :, mask])
    assert not np.allclose(got[:, :, ~mask], original[:, :, ~mask])  # skipped positions are interpolated
    assert_close(got, run_reference(out, x)[0])  # the library agrees with the reference everywhere


def test_all_ones_through_every_pass_combination(backend):
    after = [bn, unary("LeakyRelu", alpha=0.2), binary("Mul", RNG.normal(size=(1, 8, 1, 1))), unary("Sigmoid")]
    model = conv_model(after=after)
    for fuse in (True, False):
        assert_reproduces(model, backend, fuse=fuse)
    assert_reproduces(model, backend, fold_batchnorm=False)
    assert_reproduces(model, backend, interpolate_late=False)


# ----------------------------------------------------------------------------------------------------
# Passes (each pass has its own test file: test_batchnorm.py, test_activation.py, test_interpolate_late.py,
# test_compact.py)


def test_passes_say_why_they_did_not_apply():
    model = conv_model(after=[unary("Relu")])
    _, report = rewrite_with_report(model, {"conv": ones_for(model)}, fuse=False)
    assert report.layers[0].skipped == {
        "fold_batchnorm": "turned off", "fuse_activation": "turned off", "interpolate_late": "turned off"
    }
    _, report = rewrite_with_report(model, {"conv": ones_for(model)})
    skipped = report.layers[0].skipped
    assert "not BatchNormalization" in skipped["fold_batchnorm"]
    assert "Identity" in skipped["interpolate_late"]
    assert "fold_batchnorm" in report.format()


# ----------------------------------------------------------------------------------------------------
# Models people have


def test_constant_node_weights_and_unnamed_conv(backend):
    w = helper.make_node("Constant", [], ["W"], value=f32("w", RNG.normal(size=(4, 3, 3, 3))))
    b = helper.make_node("Constant", [], ["B"], value=f32("b", RNG.normal(size=4)))
    nodes = [w, b, helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             *bn("c", channels=4)[0], helper.make_node("Relu", ["bn"], ["y"])]
    model = build(nodes, bn("c", channels=4)[1])
    out, report = rewrite_with_report(model, {"c": np.ones((12, 12), bool)})
    assert report.layers[0].folded_batchnorm == "bn"
    assert {"c.mask", "c.nn_index"} <= {t.name for t in out.graph.initializer}
    names = {n.name for n in out.graph.node}
    assert {"c", "c/interpolate"} <= names
    x = x_for(model)
    assert_close(run_backend(backend, out, x)[0], run_ort(model, x, library=False)[0])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_auto_pad_is_resolved_to_explicit_pads(auto_pad, strides, backend):
    model = conv_model(auto_pad=auto_pad, strides=strides)
    out = assert_reproduces(model, backend)
    conv = next(n for n in out.graph.node if n.op_type == "PerforatedConv")
    assert "auto_pad" not in {a.name for a in conv.attribute}


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21])
def test_opsets(opset, backend):
    model = conv_model(after=[bn, unary("Relu"), binary("Mul", RNG.normal(size=(8, 1, 1)))], opset=opset)
    out = assert_reproduces(model, backend)
    assert [o.version for o in out.opset_import if o.domain == ""] == [opset]


def test_ir3_model_with_initializers_as_inputs(backend):
    model = conv_model(after=[unary("Relu")], opset=7)
    model.ir_version = 3
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model)
    out, report = rewrite_with_report(model, {"conv": ones_for(model)})
    assert out.ir_version == 4 and any("IR version" in n for n in report.notes)
    assert_valid(out)
    x = x_for(model)
    assert_close(run_backend(backend, out, x)[0], run_ort(model, x, library=False)[0])


def test_initializer_inputs_are_kept_for_ir4_and_later():
    model = conv_model(after=[unary("Relu")])
    model.graph.input.append(helper.make_tensor_value_info("B", TensorProto.FLOAT, [8]))
    out = rewrite(model, {"conv": ones_for(model)})
    assert [i.name for i in out.graph.input] == ["x", "B"]
    assert_valid(out)


def test_nhwc_model_with_transpose_before_first_conv(backend):
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = build(nodes, [f32("W", RNG.normal(size=(4, 3, 3, 3)))], x_shape=("N", 10, 12, 3))
    out = rewrite(model, {"conv": np.ones((10, 12), bool)})
    assert_valid(out)
    x = x_for(model)
    assert_close(run_backend(backend, out, x)[0], run_ort(model, x, library=False)[0])


def test_grouped_dilated_strided_conv(backend):
    w = f32("W", RNG.normal(size=(6, 1, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", group=3, dilations=[2, 1],
                              strides=[2, 1], pads=[2, 0, 1, 1])]
    model = build(nodes, [w], x_shape=(2, 3, 11, 9))
    (record,) = onnx_perforate.inspect(model)
    out = rewrite(model, {"conv": np.ones(record.output_shape[2:], bool)})
    assert_valid(out)
    x = x_for(model)
    assert_close(run_backend(backend, out, x)[0], run_ort(model, x, library=False)[0])


def test_external_data_round_trip(tmp_path):
    model = conv_model(after=[unary("Relu")])
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    out = rewrite(src, {"conv": masks.grid((12, 12), 0.5)})
    dst = tmp_path / "out" / "perforated.onnx"
    onnx_perforate.rewrite_save(out, dst, external_data=True)
    assert (dst.parent / "perforated.onnx.data").is_file()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    loaded = onnx.load(dst)
    assert_valid(loaded)
    x = x_for(model)
    assert_close(run_reference(loaded, x)[0], run_reference(out, x)[0])


# ----------------------------------------------------------------------------------------------------
# Errors


def test_unknown_node_is_named():
    model = conv_model()
    with pytest.raises(UnknownNodeError, match="'nope'.*'conv'"):
        rewrite(model, {"nope": np.ones((12, 12), bool)})


def test_mask_shape_must_match_output():
    model = conv_model()
    with pytest.raises(MaskShapeError, match=r"'conv'.*\[11, 12\].*\[12, 12\]"):
        rewrite(model, {"conv": np.ones((11, 12), bool)})


def test_all_false_mask():
    model = conv_model()
    before = model.SerializeToString()
    with pytest.raises(EmptyMaskError, match="'conv'"):
        rewrite(model, {"conv": np.zeros((12, 12), bool)})
    assert model.SerializeToString() == before


def test_dynamic_spatial_size():
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = build(nodes, [f32("W", RNG.normal(size=(4, 3, 3, 3)))], x_shape=("N", 3, "H", "W"))
    with pytest.raises(DynamicShapeError, match="'conv'.*'x'"):
        rewrite(model, {"conv": np.ones((12, 12), bool)})


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_convolutions(dims):
    w = f32("W", RNG.normal(size=(4, 3) + (3,) * dims))
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    model = build(nodes, [w], x_shape=(1, 3) + (8,) * dims)
    with pytest.raises(UnsupportedNodeError, match=f"'conv' is a {dims}-D convolution"):
        rewrite(model, {"conv": np.ones((6, 6), bool)})


def test_quantized_convolutions():
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4, 6, 6])
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "W")
    node = helper.make_node("ConvInteger", ["x", "W"], ["y"], name="qconv")
    model = helper.make_model(helper.make_graph([node], "q", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedNodeError, match="'qconv' is a ConvInteger"):
        rewrite(model, {"qconv": np.ones((6, 6), bool)})


def test_not_a_conv_and_already_perforated():
    model = conv_model(after=[unary("Relu")])
    with pytest.raises(UnsupportedNodeError, match="'relu' is a Relu"):
        rewrite(model, {"relu": np.ones((12, 12), bool)})
    out = rewrite(model, {"conv": ones_for(model)})
    with pytest.raises(UnsupportedNodeError, match="already perforated"):
        rewrite(out, {"conv": np.ones((12, 12), bool)})


def test_errors_are_value_errors():
    assert issubclass(PerforateError, ValueError)
    with pytest.raises(ValueError):
        rewrite(conv_model(), {})


def _optimized_ops(model, tmp_path, name):
    """(op_type, domain) of every node of ORT's optimized graph of ``model`` (the library registered)."""
    import onnxruntime as ort

    options = onnx_perforate.session_options(1)
    options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [(n.op_type, n.domain) for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.usefixtures("require_library")
def test_tensors_after_custom_ops_keep_their_shapes_for_ort(tmp_path):
    """ORT infers no shapes through a custom-op library: the rewrite writes them (value_info) so that
    the standard ops after a perforated layer keep theirs, and ORT's NCHWc transformer still takes the
    MaxPool and GlobalAveragePool after conv4 (conv2 perforated), as in the original."""
    from helpers import sample_file

    model = onnx.load(str(sample_file("fashion_cnn.onnx")))
    perforated = rewrite(model, {"conv2": masks.uniform((28, 28), 0.5, seed=0)})
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in perforated.graph.value_info}
    assert shapes["/pool2/MaxPool_output_0"] == ["N", 64, 7, 7]
    original_ops, perforated_ops = _optimized_ops(model, tmp_path, "original"), _optimized_ops(perforated, tmp_path, "p")
    blocked = [op for op in original_ops if op[1] == "com.microsoft.nchwc" and op[0] in ("MaxPool", "GlobalAveragePool")]
    if not blocked:
        pytest.skip("ORT's NCHWc transformer does not run on this CPU")
    assert ("MaxPool", "") not in perforated_ops and ("GlobalAveragePool", "") not in perforated_ops
    assert perforated_ops.count(("MaxPool", "com.microsoft.nchwc")) == 1  # pool2 (pool1 is a CompactPool)
