"""The domain's ONNX schemas (opset.py): registered on import, onnx's shape inference and full checker
on every bundled sample and on SqueezeNet in the custom-op and portable forms with no value_info, and
the errors inference reports for bad nodes."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate
from helpers import SAMPLE_MODELS, SQUEEZENET
from onnx_perforate import masks, ops, opset
from onnx_perforate.opset import OPERATORS

SAMPLES = sorted(SAMPLE_MODELS.glob("*.onnx"))
DOMAIN = onnx_perforate.DOMAIN
RNG = np.random.default_rng(7)


def test_every_op_is_registered_with_its_attributes_and_defaults():
    onnx_perforate.register_schemas()  # on demand too, and idempotent
    for op in OPERATORS:
        schema = onnx.defs.get_schema(op.name, op.since_version, DOMAIN)
        assert [i.name for i in schema.inputs] == [p.name for p in op.inputs]
        assert schema.has_type_and_shape_inference_function
        for attribute in op.attributes:
            declared = schema.attributes[attribute.name]
            if attribute.default is None:
                assert declared.required == attribute.required and not declared.default_value.name
            else:
                assert declared.default_value == helper.make_attribute(attribute.name, attribute.default)
    conv = onnx.defs.get_schema("PerforatedConv", 1, DOMAIN)
    assert conv.inputs[4].option == onnx.defs.OpSchema.FormalParameterOption.Optional
    assert helper.get_attribute_value(conv.attributes["pads"].default_value) == [0, 0, 0, 0]


def _without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as if written by hand: no value_info, graph outputs without shapes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    for output in copy.graph.output:
        output.type.tensor_type.ClearField("shape")
    return copy


def _check_inferred(model: onnx.ModelProto, outputs_known: bool = True):
    """Full checker, strict inference with no value_info; every custom op's inferred output shape equals
    the shape the numpy reference of the ops produces (batch 2)."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(_without_value_info(model), check_type=True, strict_mode=True,
                                                 data_prop=True)  # a converted SqueezeNet reshapes by Shape()
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    custom = [n.output[0] for n in inferred.graph.node if n.domain == DOMAIN]
    for output in inferred.graph.output if outputs_known else ():
        assert output.type.tensor_type.HasField("shape"), output.name
    if not custom:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(types[name] for name in custom)
    data = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    dims = [d.dim_value or 2 for d in data.type.tensor_type.shape.dim]
    results = ops.reference_evaluator(probe).run(custom, {data.name: RNG.uniform(0, 255, dims).astype(np.float32)})
    for name, value in zip(custom, results):
        declared = [d.dim_value if d.HasField("dim_value") else None for d in types[name].type.tensor_type.shape.dim]
        assert len(declared) == value.ndim and all(d in (None, v) for d, v in zip(declared, value.shape)), name
        assert None not in declared[1:], f"{name}: {declared}"  # all but the batch are inferred
    return len(custom)


def _perforate_everything(model, **options):
    chosen = {r.name: masks.grid(r.output_shape[2:], 0.5) for r in onnx_perforate.inspect(model) if r.perforable}
    return onnx_perforate.rewrite(model, chosen, **options)


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
@pytest.mark.parametrize("options", [dict(), dict(compact=False), dict(portable=True), dict(portable="expanded")],
                         ids=["compact", "explicit", "portable", "expanded"])
def test_shape_inference_and_full_check_on_samples(path, options):
    model = _perforate_everything(onnx.load(path), **options)
    count = _check_inferred(model)
    assert count == (0 if options.get("portable") == "expanded" else sum(n.domain == DOMAIN for n in model.graph.node))


@pytest.mark.shared
@pytest.mark.skipif(not SQUEEZENET.is_file(), reason="../shared/data/imagenet/squeezenet1.1.onnx is absent")
@pytest.mark.parametrize("portable", [False, True])
def test_shape_inference_and_full_check_on_squeezenet(portable):
    model = _perforate_everything(onnx.load(SQUEEZENET), portable=portable)
    # The portable form converts SqueezeNet from opset 7 to 13, and onnx's converter turns the final
    # Softmax into Softmax + Reshape(Shape(x)), whose output shape onnx does not infer (nor for the
    # converted original model): only the custom ops' outputs are checked there.
    assert _check_inferred(model, outputs_known=not portable) > 20


# ----------------------------------------------------------------------------------------------------
# What inference reports for bad nodes


def _model(nodes, initializers, x_shape, y_rank):
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"y{i}" for i in range(y_rank)])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def _conv(mask, *, w_shape=(4, 3, 3, 3), x_shape=(1, 3, 6, 6), **attrs):
    attrs = {"pads": [1, 1, 1, 1], **attrs}
    inits = [numpy_helper.from_array(RNG.standard_normal(w_shape).astype(np.float32), "w"),
             numpy_helper.from_array(np.asarray(mask, bool), "mask")]
    node = helper.make_node("PerforatedConv", ["x", "w", "", "mask"], ["y"], domain=DOMAIN, name="pc", **attrs)
    return _model([node], inits, list(x_shape), 3)


def _infer_error(model) -> str:
    with pytest.raises(onnx.shape_inference.InferenceError) as error:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return str(error.value)


def test_inference_gives_k_from_the_mask():
    mask = RNG.random((6, 6)) < 0.4
    mask[0, 0] = True
    inferred = onnx.shape_inference.infer_shapes(_conv(mask), strict_mode=True)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 4, int(mask.sum())]


@pytest.mark.parametrize("case, expected", [
    (dict(mask=np.ones((5, 6), bool)), "mask has shape [5, 6], expected the convolution's output size [6, 6]"),
    (dict(mask=np.zeros((6, 6), bool)), "mask has no nonzero entry"),
    (dict(mask=np.ones((6, 6), bool), x_shape=(1, 3, 6)), "input X has rank 3"),
    (dict(mask=np.ones((6, 6), bool), w_shape=(4, 2, 3, 3)), "X has 3 channels but W [4, 2, 3, 3]"),
    (dict(mask=np.ones((6, 6), bool), kernel_shape=[5, 5]), "kernel_shape [5, 5] does not match W"),
    (dict(mask=np.ones((6, 6), bool), activation="Gelu"), "unknown activation 'Gelu'"),
])
def test_inference_names_the_node_and_the_problem(case, expected):
    message = _infer_error(_conv(**case))
    assert "PerforatedConv[onnx_perforate] (pc)" in message and expected in message


def test_inference_checks_the_interpolation_index():
    inits = [numpy_helper.from_array(np.array([[0, 1], [2, 5]], np.int64), "index")]
    node = helper.make_node("NNInterpolate", ["x", "index"], ["y"], domain=DOMAIN, name="fill")
    message = _infer_error(_model([node], inits, [1, 2, 4], 4))
    assert "NNInterpolate[onnx_perforate] (fill)" in message and "outside [0, 4)" in message
    ok = onnx.shape_inference.infer_shapes(_model([node], inits, [1, 2, 6], 4), strict_mode=True)
    assert [d.dim_value for d in ok.graph.output[0].type.tensor_type.shape.dim] == [1, 2, 2, 2]


def test_checker_refuses_an_attribute_the_op_does_not_have():
    model = _conv(np.ones((6, 6), bool), auto_pad="SAME_UPPER")
    with pytest.raises(onnx.checker.ValidationError, match="auto_pad"):
        onnx.checker.check_model(model, full_check=True)


def test_definition_lookup():
    assert opset.definition("PerforatedConv").name == "PerforatedConv"
    assert opset.definition("NoSuchOp") is None


def test_compact_pool_inference_and_errors():
    inits = [numpy_helper.from_array(np.arange(16, dtype=np.int64).reshape(4, 4) % 6, "index")]

    def pool(**attrs):
        node = helper.make_node("CompactPool", ["x", "index"], ["y"], domain=DOMAIN, name="pool", **attrs)
        return _model([node], inits, [1, 2, 6], 4)

    inferred = onnx.shape_inference.infer_shapes(pool(mode="max", kernel_shape=[2, 2], strides=[2, 2]), strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [1, 2, 2, 2]
    assert "mode 'min'" in _infer_error(pool(mode="min", kernel_shape=[2, 2]))
    assert "average pooling takes no dilations" in _infer_error(pool(mode="average", kernel_shape=[2, 2], dilations=[2, 2]))
    with pytest.raises(onnx.checker.ValidationError, match="kernel_shape"):  # required
        onnx.checker.check_model(pool(mode="max"), full_check=True)
