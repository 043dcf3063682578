"""A slow way to run a perforated model in ORT without the compiled library: onnxruntime-extensions'
Python custom ops, calling the numpy reference implementations of ``ops.py``.

onnxruntime-extensions only runs Python ops of its own domain (``ai.onnx.contrib``) and only passes
scalar int/float/string attributes, so :func:`to_python_op_model` moves the two ops to that domain,
packs their list attributes into one JSON string attribute and gives PerforatedConv an explicit zero
bias where it had none. Install with ``pip install onnx-perforate[fallback]``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ops
from ._library import DOMAIN, plain_session_options
from .errors import PerforateError
from .graph import infer_shapes, load_model

log = logging.getLogger(__name__)

ATTRIBUTE = "attributes"  # the JSON-packed attribute of the Python-op model
COMPACT_INPUT_OP = "PerforatedConvCompactInput"  # PerforatedConv with its optional X_index input
POOL_POSITIONS_OP = "CompactPoolPositions"  # CompactPool with its optional Y_positions input
QUANTIZED_OP = "PerforatedQLinearConv"
QUANTIZED_COMPACT_INPUT_OP = "PerforatedQLinearConvCompactInput"  # with its optional X_index input
# Python ops have one type per input: the 8-bit variants of NNInterpolate and CompactPool are ops of their
# own, named with the suffix of their element type (NNInterpolateUint8, CompactPoolInt8, ...); the
# quantized convolutions take uint8 by default and the Int8 suffix for int8 activations.
BYTE_SUFFIXES = {onnx.TensorProto.UINT8: "Uint8", onnx.TensorProto.INT8: "Int8"}
INT8_SUFFIX = BYTE_SUFFIXES[onnx.TensorProto.INT8]
_registered = False


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise PerforateError(
            "the Python fallback needs onnxruntime-extensions (pip install onnx-perforate[fallback])"
        ) from exc
    return onnxruntime_extensions


def python_domain() -> str:
    return _extensions().default_opset_domain()


def to_python_op_model(model) -> onnx.ModelProto:
    """A copy of a perforated model whose custom ops run as onnxruntime-extensions Python ops."""
    model = load_model(model)
    domain = python_domain()
    # Types and shapes of the unconverted model (the loop below changes the nodes one by one).
    shapes = infer_shapes(model) if any(n.domain == DOMAIN and n.op_type in ("NNInterpolate", "CompactPool", QUANTIZED_OP)
                                        for n in model.graph.node) else None
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type == "PerforatedConv" and (len(node.input) < 3 or not node.input[2]):
            shapes = shapes or infer_shapes(model)
            w_shape = shapes.get(node.input[1], (0, None))[1]
            if not w_shape or not isinstance(w_shape[0], int):
                raise PerforateError(f"PerforatedConv {node.name!r}: the output channel count of {node.input[1]!r} is unknown")
            bias = numpy_helper.from_array(np.zeros(w_shape[0], np.float32), f"{node.name or node.output[0]}.zero_bias")
            model.graph.initializer.append(bias)
            inputs = list(node.input) + [""] * (3 - len(node.input))
            inputs[2] = bias.name
            del node.input[:]
            node.input.extend(inputs)
        if node.op_type == QUANTIZED_OP and (len(node.input) < 9 or not node.input[8]):
            w_shape = shapes.get(node.input[3], (0, None))[1]
            if not w_shape or not isinstance(w_shape[0], int):
                raise PerforateError(f"{QUANTIZED_OP} {node.name!r}: the output channel count of {node.input[3]!r} is unknown")
            bias = numpy_helper.from_array(np.zeros(w_shape[0], np.int32), f"{node.name or node.output[0]}.zero_bias")
            model.graph.initializer.append(bias)
            node.input[8] = bias.name
        activations = shapes.get(node.input[0], (0, None))[0] if shapes else 0
        if node.op_type == "NNInterpolate":
            node.op_type += BYTE_SUFFIXES.get(activations, "")
        packed = {a.name: _jsonable(helper.get_attribute_value(a)) for a in node.attribute}
        del node.attribute[:]
        if node.op_type == QUANTIZED_OP and len(node.input) > 10 and node.input[10]:
            node.op_type = QUANTIZED_COMPACT_INPUT_OP
        elif node.op_type == QUANTIZED_OP:
            del node.input[10:]
        if node.op_type == "PerforatedConv" and len(node.input) > 4 and node.input[4]:
            node.op_type = COMPACT_INPUT_OP  # Python ops have a fixed input count
        if node.op_type == "CompactPool" and len(node.input) > 2 and node.input[2]:
            node.op_type = POOL_POSITIONS_OP
        elif node.op_type == "CompactPool":
            del node.input[2:]
        if node.op_type in ("PerforatedConv", COMPACT_INPUT_OP, "CompactPool", POOL_POSITIONS_OP, QUANTIZED_OP,
                            QUANTIZED_COMPACT_INPUT_OP):
            node.attribute.append(helper.make_attribute(ATTRIBUTE, json.dumps(packed, sort_keys=True)))
        if node.op_type in (QUANTIZED_OP, QUANTIZED_COMPACT_INPUT_OP) and activations == onnx.TensorProto.INT8:
            node.op_type += INT8_SUFFIX
        if node.op_type in ("CompactPool", POOL_POSITIONS_OP):
            node.op_type += BYTE_SUFFIXES.get(activations, "")
        node.domain = domain
    imports = [o for o in model.opset_import if o.domain not in (DOMAIN, domain)]
    del model.opset_import[:]
    model.opset_import.extend(imports + [helper.make_opsetid(domain, 1)])
    return model


def _jsonable(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def register_python_ops() -> None:
    """Register the Python ops with onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    ext = _extensions()
    dt = ext.PyCustomOpDef

    @ext.onnx_op(op_type="PerforatedConv", inputs=[dt.dt_float, dt.dt_float, dt.dt_float, dt.dt_bool],
                 outputs=[dt.dt_float], attrs={ATTRIBUTE: dt.dt_string})
    def perforated_conv(x, w, b, mask, **kwargs):
        attributes = json.loads(kwargs.get(ATTRIBUTE) or "{}")
        return ops.perforated_conv_reference(x, w, b, mask, **attributes)

    @ext.onnx_op(op_type=COMPACT_INPUT_OP, inputs=[dt.dt_float, dt.dt_float, dt.dt_float, dt.dt_bool, dt.dt_int64],
                 outputs=[dt.dt_float], attrs={ATTRIBUTE: dt.dt_string})
    def perforated_conv_compact_input(x, w, b, mask, x_index, **kwargs):
        attributes = json.loads(kwargs.get(ATTRIBUTE) or "{}")
        return ops.perforated_conv_reference(x, w, b, mask, x_index=x_index, **attributes)

    @ext.onnx_op(op_type="NNInterpolate", inputs=[dt.dt_float, dt.dt_int64], outputs=[dt.dt_float])
    def nn_interpolate(yc, index):
        return ops.nn_interpolate_reference(yc, index)

    def compact_pool_ops(element, suffix):
        @ext.onnx_op(op_type="CompactPool" + suffix, inputs=[element, dt.dt_int64], outputs=[element],
                     attrs={ATTRIBUTE: dt.dt_string})
        def compact_pool(x, x_index, **kwargs):
            return ops.compact_pool_reference(x, x_index, **json.loads(kwargs.get(ATTRIBUTE) or "{}"))

        @ext.onnx_op(op_type=POOL_POSITIONS_OP + suffix, inputs=[element, dt.dt_int64, dt.dt_int64],
                     outputs=[element], attrs={ATTRIBUTE: dt.dt_string})
        def compact_pool_positions(x, x_index, y_positions, **kwargs):
            return ops.compact_pool_reference(x, x_index, y_positions, **json.loads(kwargs.get(ATTRIBUTE) or "{}"))

    compact_pool_ops(dt.dt_float, "")
    compact_pool_ops(dt.dt_uint8, BYTE_SUFFIXES[onnx.TensorProto.UINT8])
    compact_pool_ops(dt.dt_int8, INT8_SUFFIX)

    def quantized_ops(activation, suffix):
        inputs = [activation, dt.dt_float, activation, dt.dt_int8, dt.dt_float, dt.dt_int8, dt.dt_float, activation,
                  dt.dt_int32, dt.dt_bool]

        @ext.onnx_op(op_type=QUANTIZED_OP + suffix, inputs=inputs, outputs=[activation], attrs={ATTRIBUTE: dt.dt_string})
        def perforated_qlinear_conv(*inputs, **kwargs):
            return ops.perforated_qlinear_conv_reference(*inputs, **json.loads(kwargs.get(ATTRIBUTE) or "{}"))

        @ext.onnx_op(op_type=QUANTIZED_COMPACT_INPUT_OP + suffix, inputs=inputs + [dt.dt_int64], outputs=[activation],
                     attrs={ATTRIBUTE: dt.dt_string})
        def perforated_qlinear_conv_compact_input(*inputs, **kwargs):
            return ops.perforated_qlinear_conv_reference(*inputs[:10], x_index=inputs[10],
                                                         **json.loads(kwargs.get(ATTRIBUTE) or "{}"))

    quantized_ops(dt.dt_uint8, "")
    quantized_ops(dt.dt_int8, INT8_SUFFIX)

    for element, kind in ((dt.dt_uint8, onnx.TensorProto.UINT8), (dt.dt_int8, onnx.TensorProto.INT8)):
        @ext.onnx_op(op_type="NNInterpolate" + BYTE_SUFFIXES[kind], inputs=[element, dt.dt_int64], outputs=[element])
        def nn_interpolate_bytes(yc, index):
            return ops.nn_interpolate_reference(yc, index)

    _registered = True


def fallback_session(model, options=None):
    """An ORT session that runs a perforated model through the slow Python ops."""
    import onnxruntime as ort

    ext = _extensions()
    log.warning(
        "the onnx-perforate custom-op library is not available: running its custom ops "
        "as slow Python ops (onnxruntime-extensions); timings are meaningless"
    )
    register_python_ops()
    options = options or plain_session_options()
    options.register_custom_ops_library(ext.get_library_path())
    converted = to_python_op_model(model)
    return ort.InferenceSession(converted.SerializeToString(), options, providers=["CPUExecutionProvider"])


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain == DOMAIN for node in model.graph.node)


def session(model, threads: int | None = None, *, allow_spinning: bool | None = None):
    """An ORT session for any model: with the compiled library when the model needs it and it is
    installed, else with the Python fallback (warning), else plain ORT."""
    import onnxruntime as ort

    from ._library import has_library, session_options

    model = load_model(model)
    if uses_custom_ops(model) and not has_library():
        options = plain_session_options()
        if threads:
            options.intra_op_num_threads = threads
        return fallback_session(model, options)
    options = session_options(threads, allow_spinning=allow_spinning) if has_library() else plain_session_options()
    if not has_library() and threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
