"""Quantized convolutions: the QDQ pattern and QLinearConv become PerforatedQLinearConv (docs/rewriter.md).

Two forms are recognised, both with uint8 or int8 activations (U8S8, S8S8) and 8-bit weights (per
tensor or per output channel):

- QDQ: ``DequantizeLinear(x_q) -> Conv(DequantizeLinear(w_q), DequantizeLinear(b_q)?) -> [Relu | Clip]
  -> QuantizeLinear`` (the Conv is the node the mask names);
- QOperator: ``QLinearConv``.

Either becomes ``PerforatedQLinearConv -> NNInterpolate`` on uint8 (or int8), producing the QuantizeLinear's (or
QLinearConv's) output tensor, so the rest of the graph is untouched; a Relu or Clip between the Conv
and the QuantizeLinear is fused (it is a clamp of the quantized value). The INT8 arithmetic is the one
ORT runs for the same pattern (its QDQ fusion turns it into QLinearConv), bit for bit.

Parameters may be initializers or Constant nodes; a weight or bias written as QuantizeLinear of constants
is folded here (:func:`onnx_perforate.ops.quantize_linear`). Weights with a nonzero zero point (int8, or
uint8 shifted to int8) run as they are, or as symmetric ``w - w_zero_point`` where that fits int8.

Anything else is refused with an :class:`~onnx_perforate.errors.UnsupportedNodeError` naming the Conv
and what was found: mixed activation types, per-channel activation parameters, per-axis weight parameters on
another axis than 0, a bias whose scale is not x_scale * w_scale, a Conv whose output is not quantized.
ConvInteger is refused by :func:`onnx_perforate.graph.conv_geometry`.

The compact pass (passes/compact.py) then keeps the 8-bit compact outputs compact: through
per-tensor DequantizeLinear / QuantizeLinear, the ops between them that stay compact (Concat, Relu,
Dropout, ...), into perforated quantized convolutions (``X_index``, or a plain GEMM for a 1x1 conv with
the same mask). NNInterpolate remains only where a consumer needs the full tensor, e.g. before the
8-bit MaxPools of full tensors, which :func:`pool_channels_last` runs channels-last (those reading a
perforated output become an 8-bit CompactPool).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import ops
from .._library import DOMAIN
from ..errors import UnsupportedNodeError
from .activation import clip_bounds
from .surgery import Surgeon, constant_value, describe

QUANTIZED_OP = "PerforatedQLinearConv"
ACTIVATION_TYPES = (np.dtype(np.uint8), np.dtype(np.int8))  # U8S8 and S8S8


@dataclass
class QuantizedConv:
    """A matched quantized convolution: QLinearConv's nine inputs, what it replaces and what it writes."""

    inputs: list  # x_q, x_scale, x_zero_point, w_q, w_scale, w_zero_point, y_scale, y_zero_point, B or empty
    output: gs.Variable  # the 8-bit tensor the rewrite produces (the QuantizeLinear's output)
    replaced: list = field(default_factory=list)  # nodes removed: Conv / QLinearConv, activation, QuantizeLinear
    activation: str = ""
    clip_min: float = -ops.FLOAT32_MAX
    clip_max: float = ops.FLOAT32_MAX


def is_quantized(conv: gs.Node) -> bool:
    """True for QLinearConv and for a Conv whose weight is the output of a DequantizeLinear (QDQ)."""
    if conv.op == "QLinearConv":
        return True
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    return conv.op == "Conv" and weight is not None and _producer(weight, "DequantizeLinear") is not None


def match(surgeon: Surgeon, conv: gs.Node, key: str) -> QuantizedConv:
    """The quantized convolution ``conv`` belongs to, or an UnsupportedNodeError naming it."""
    if conv.op == "QLinearConv":
        matched = _match_qlinear_conv(conv, key)
    else:
        matched = _match_qdq(surgeon, conv, key)
    matched.inputs[3] = _folded(surgeon, matched.inputs[3], key, "w")
    _centre_weights(surgeon, matched, key)
    _check_parameters(matched, key)
    if conv.op == "Conv":  # the bias once the scales it is measured in are known to be valid
        matched.inputs[8] = _quantized_bias(surgeon, conv, key, matched.inputs[1], matched.inputs[4])
    return matched


def perforate(surgeon: Surgeon, matched: QuantizedConv, name: str, key: str, attrs: ops.ConvAttributes,
              mask: np.ndarray, output_shape) -> gs.Node:
    """Replace the matched nodes by PerforatedQLinearConv + NNInterpolate; returns the NNInterpolate."""
    for node in matched.replaced:
        surgeon.detach(node)
    attrs.activation, attrs.clip_min, attrs.clip_max = matched.activation, matched.clip_min, matched.clip_max
    batch, channels = output_shape[0], output_shape[1]
    out = matched.output
    dtype = activation_type(matched)
    compact = gs.Variable(surgeon.unique(f"{out.name}.compact"), dtype=dtype,
                          shape=[batch, channels, int(mask.sum())])
    inputs = list(matched.inputs) + [surgeon.constant(f"{key}.mask", mask.astype(bool))]
    surgeon.names.add(name)
    surgeon.graph.nodes.append(gs.Node(QUANTIZED_OP, name=name, domain=DOMAIN, attrs=attrs.to_onnx(),
                                       inputs=inputs, outputs=[compact]))
    index = surgeon.constant(f"{key}.nn_index", ops.nearest_index(mask))
    out.dtype, out.shape = dtype, list(output_shape)
    interpolate = gs.Node("NNInterpolate", name=surgeon.unique(f"{name}/interpolate"), domain=DOMAIN,
                          inputs=[compact, index], outputs=[out])
    surgeon.graph.nodes.append(interpolate)
    return interpolate


def pool_channels_last(surgeon: Surgeon) -> dict[str, str]:
    """Every ``DequantizeLinear -> MaxPool -> QuantizeLinear`` with equal uint8 (or int8) parameters is
    pooled on the 8-bit tensor itself; returns {MaxPool: how}.

    ORT drops such a DQ/Q pair and max-pools the uint8 tensor itself, exactly (the maximum of quantized
    values is the quantized maximum); in an all-INT8 model its NHWC pass then runs the channels-last
    kernel. Next to the NCHW custom ops that pass leaves the MaxPool in NCHW, where ORT's uint8 kernel is
    generic code (11.6 ms instead of 0.08 ms for SqueezeNet's first pool, one thread). So:

    - when the pooled tensor is an NNInterpolate's output that nothing else reads, an 8-bit CompactPool
      reads the compact tensor through the index (no interpolated planes, no layout change; when the
      readers are perforated 1x1 convolutions with one mask, only their positions, as ``[N, C, K]``);
    - otherwise ``Transpose -> com.microsoft.NhwcMaxPool -> Transpose`` restores ORT's fast kernel for
      two small uint8 transposes."""
    rewritten = {}
    # Without the DequantizeLinears left unread by the quantized convolutions, a pooled tensor's readers
    # are the convolutions themselves.
    surgeon.graph.cleanup(remove_unused_graph_inputs=False)
    for pool in [n for n in surgeon.graph.nodes if n.op == "MaxPool" and len(n.outputs) == 1]:
        dq = _producer(pool.inputs[0], "DequantizeLinear")
        q = surgeon.sole_consumer(pool.outputs[0])
        if dq is None or not isinstance(q, gs.Node) or q.op != "QuantizeLinear" or len(dq.inputs) < 3 or len(q.inputs) < 3:
            continue
        params = [constant_value(t) for t in (dq.inputs[1], dq.inputs[2], q.inputs[1], q.inputs[2])]
        if (any(p is None or p.size != 1 for p in params) or params[1].dtype not in ACTIVATION_TYPES
                or params[3].dtype != params[1].dtype):
            continue
        if params[0].reshape(()) != params[2].reshape(()) or params[1].reshape(()) != params[3].reshape(()):
            continue
        if any(k in pool.attrs and pool.attrs[k] not in (0, b"NOTSET", "NOTSET") for k in ("storage_order", "auto_pad")):
            continue
        name = pool.name or pool.outputs[0].name
        source, result = dq.inputs[0], q.outputs[0]
        q.outputs.clear()
        surgeon.detach(pool)
        surgeon.detach(q)
        interpolate = _producer(source, "NNInterpolate")
        pool_attrs = ops.compact_pool_attributes("MaxPool", pool.attrs)
        if (interpolate is not None and interpolate.domain == DOMAIN and len(source.outputs) == 1
                and source.outputs[0] is dq and source not in surgeon.graph.outputs
                and len(pool_attrs["kernel_shape"]) == 2
                and all(p < k for p, k in zip(pool_attrs["pads"], pool_attrs["kernel_shape"] * 2))):
            # The pool is the interpolated tensor's only reader: pool the compact tensor through its index.
            # SqueezeNet INT8 at grid r=0.5, one thread: pool1 0.039 ms against 0.074 ms for the
            # Transpose -> Gather -> NhwcMaxPool -> Gather -> Transpose chain it replaces (benchmarks.md).
            compact, index = interpolate.inputs
            surgeon.detach(dq)
            surgeon.detach(interpolate)
            inputs, out, how = [compact, index], result, "CompactPool on the compact 8-bit tensor"
            mask = _pointwise_readers_mask(surgeon, result)
            if mask is not None:
                inputs.append(surgeon.constant(f"{name}.positions", np.flatnonzero(mask).astype(np.int64)))
                out = gs.Variable(surgeon.unique(f"{name}.compact"), dtype=params[1].dtype)
                how += ", at the positions its perforated 1x1 readers compute"
                _readers_read_rows(surgeon, name, result, out, mask)
            surgeon.graph.nodes.append(gs.Node("CompactPool", name=surgeon.unique(name), domain=DOMAIN,
                                               attrs=pool_attrs, inputs=inputs, outputs=[out]))
            rewritten[name] = how
            continue
        nhwc_in = gs.Variable(surgeon.unique(f"{name}.nhwc_input"), dtype=params[1].dtype)
        nhwc_out = gs.Variable(surgeon.unique(f"{name}.nhwc_output"), dtype=params[1].dtype)
        attrs = {k: v for k, v in pool.attrs.items() if k in ("kernel_shape", "strides", "pads", "dilations", "ceil_mode")}
        surgeon.graph.nodes.append(gs.Node("Transpose", name=surgeon.unique(f"{name}/to_nhwc"),
                                           attrs={"perm": [0, 2, 3, 1]}, inputs=[source], outputs=[nhwc_in]))
        surgeon.graph.nodes.append(gs.Node("NhwcMaxPool", name=surgeon.unique(name), domain="com.microsoft",
                                           attrs=attrs, inputs=[nhwc_in], outputs=[nhwc_out]))
        mask = _pointwise_readers_mask(surgeon, result)
        if mask is not None:
            # Its readers are perforated 1x1 convolutions with one mask: they read only those pixels, so
            # gather those rows of the channels-last output and give the readers [N, C, K] (one row, an
            # all-ones [1, K] mask) instead of transposing the whole pooled tensor back to NCHW.
            flat = gs.Variable(surgeon.unique(f"{name}.nhwc_flat"), dtype=params[1].dtype)
            picked = gs.Variable(surgeon.unique(f"{name}.nhwc_rows"), dtype=params[1].dtype)
            rows = gs.Variable(surgeon.unique(f"{name}.compact"), dtype=params[1].dtype)
            positions = surgeon.constant(f"{name}.positions", np.flatnonzero(mask).astype(np.int64))
            flat_shape = surgeon.constant(f"{name}.flat_shape", np.array([0, mask.size, -1], dtype=np.int64))
            surgeon.graph.nodes.extend([
                gs.Node("Reshape", name=surgeon.unique(f"{name}/flat"), inputs=[nhwc_out, flat_shape], outputs=[flat]),
                gs.Node("Gather", name=surgeon.unique(f"{name}/positions"), attrs={"axis": 1},
                        inputs=[flat, positions], outputs=[picked]),
                gs.Node("Transpose", name=surgeon.unique(f"{name}/to_ncK"), attrs={"perm": [0, 2, 1]},
                        inputs=[picked], outputs=[rows])])
            _readers_read_rows(surgeon, name, result, rows, mask)
        else:
            surgeon.graph.nodes.append(gs.Node("Transpose", name=surgeon.unique(f"{name}/to_nchw"),
                                               attrs={"perm": [0, 3, 1, 2]}, inputs=[nhwc_out], outputs=[result]))
        rewritten[name] = "channels-last (com.microsoft.NhwcMaxPool)"
    return rewritten


def _readers_read_rows(surgeon: Surgeon, name: str, tensor, rows, mask: np.ndarray) -> None:
    """Every reader of ``tensor`` (perforated 1x1 convolutions with ``mask``, see
    :func:`_pointwise_readers_mask`) reads ``rows`` instead: the pooled values at the mask's positions,
    [N, C, K], one row under an all-ones [1, K] mask."""
    ones = surgeon.constant(f"{name}.row_mask", np.ones((1, int(mask.sum())), dtype=bool))
    for reader in list(tensor.outputs):
        reader.inputs[0] = rows
        reader.inputs[9] = ones


def _pointwise_readers_mask(surgeon: Surgeon, tensor) -> np.ndarray | None:
    """The mask shared by every reader of ``tensor`` when all are PerforatedQLinearConvs reading it as a
    full input X (no X_index) with a 1x1 kernel, stride 1 and no padding; else None."""
    readers = list(tensor.outputs)
    if not readers or tensor in surgeon.graph.outputs:
        return None
    masks = []
    for reader in readers:
        attrs = reader.attrs
        if not (reader.op == QUANTIZED_OP and reader.domain == DOMAIN and reader.inputs[0] is tensor
                and len(reader.inputs) <= 10 and isinstance(reader.inputs[9], gs.Constant)
                and list(attrs.get("kernel_shape", [])) == [1, 1] and list(attrs.get("strides", [1, 1])) == [1, 1]
                and not any(attrs.get("pads", [0, 0, 0, 0])) and list(attrs.get("dilations", [1, 1])) == [1, 1]):
            return None
        masks.append(np.asarray(reader.inputs[9].values).astype(bool))
    if any(m.shape != masks[0].shape or not np.array_equal(m, masks[0]) for m in masks[1:]) or masks[0].ndim != 2:
        return None
    return masks[0]


# ----------------------------------------------------------------------------------------------------
# Matching


def _producer(tensor, op: str) -> gs.Node | None:
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _dequantized(tensor, what: str, key: str):
    """(quantized tensor, scale, zero point or None) of the DequantizeLinear producing ``tensor``."""
    dq = _producer(tensor, "DequantizeLinear")
    if dq is None:
        found = describe(tensor.inputs[0]) if tensor.inputs else "a graph input"
        raise UnsupportedNodeError(
            f"Conv {key!r}: {what} {tensor.name!r} comes from {found}, expected a DequantizeLinear "
            "(QDQ format: quantize the whole model with onnxruntime.quantization.quantize_static)")
    zero = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    return dq, dq.inputs[0], dq.inputs[1], zero


def _folded(surgeon: Surgeon, tensor, key: str, what: str):
    """``tensor``, or for a QuantizeLinear of constants (how quantize_static writes a weight that is a
    Constant node, and how QAT exports write every weight) a new initializer holding its value, computed
    as ONNX does (round half to even, saturate). Anything else is returned as it is, for
    :func:`_check_parameters` to accept or refuse."""
    quantizer = _producer(tensor, "QuantizeLinear")
    if quantizer is None:
        return tensor
    operands = [constant_value(t) if t.name else None for t in quantizer.inputs[:3]]
    value, scale = operands[0], operands[1]
    zero = operands[2] if len(operands) > 2 else None
    if value is None or scale is None or (len(quantizer.inputs) > 2 and quantizer.inputs[2].name and zero is None):
        return tensor
    if quantizer.attrs.get("block_size", 0):
        raise UnsupportedNodeError(f"Conv {key!r}: {describe(quantizer)} quantizes {what} {tensor.name!r} by "
                                   "blocks (block_size); expected per tensor or per output channel")
    try:
        folded = ops.quantize_linear(value, scale, zero, int(quantizer.attrs.get("axis", 1)),
                                     int(quantizer.attrs.get("output_dtype", 0)))
    except ValueError as exc:
        raise UnsupportedNodeError(f"Conv {key!r}: cannot fold {describe(quantizer)} of {what} {tensor.name!r}: {exc}") from exc
    return surgeon.constant(f"{key}.{what}_quantized", folded)


def _match_qdq(surgeon: Surgeon, conv: gs.Node, key: str) -> QuantizedConv:
    _, x_q, x_scale, x_zero = _dequantized(conv.inputs[0], "input", key)
    w_dq, w_q, w_scale, w_zero = _dequantized(conv.inputs[1], "weight", key)
    # DequantizeLinear's zero point defaults to 0 of the quantized type.
    if x_zero is None and x_q.dtype is not None and np.dtype(x_q.dtype) in ACTIVATION_TYPES:
        x_zero = surgeon.constant(f"{key}.x_zero_point", np.zeros((), x_q.dtype))
    if w_zero is None:
        w_zero = surgeon.constant(f"{key}.w_zero_point", np.zeros((), np.int8))
    axis = int(w_dq.attrs.get("axis", 1))
    w_scale_value = constant_value(w_scale)
    if w_scale_value is not None and w_scale_value.size > 1 and axis not in (0, -4):
        raise UnsupportedNodeError(f"Conv {key!r}: weight scales {w_scale.name!r} are per axis {axis}, "
                                   "expected per output channel (axis 0)")
    matched = QuantizedConv(inputs=[], output=None, replaced=[conv])
    out = conv.outputs[0]
    follower = surgeon.sole_consumer(out)
    if isinstance(follower, gs.Node) and follower.op in ops.QUANTIZED_ACTIVATIONS:
        if follower.op == "Clip":
            bounds = clip_bounds(surgeon, follower)
            if bounds is None:
                raise UnsupportedNodeError(f"Conv {key!r}: {describe(follower)} has non-constant bounds")
            matched.clip_min, matched.clip_max = bounds
        matched.activation = follower.op
        matched.replaced.append(follower)
        out = follower.outputs[0]
        follower = surgeon.sole_consumer(out)
    if not isinstance(follower, gs.Node) or follower.op != "QuantizeLinear":
        why = follower.reason if not isinstance(follower, gs.Node) else f"is read by {describe(follower)}"
        raise UnsupportedNodeError(
            f"Conv {key!r} has dequantized inputs but its output {why}, expected a single QuantizeLinear "
            "(a QDQ Conv whose result is requantized)")
    matched.replaced.append(follower)
    y_zero = follower.inputs[2] if len(follower.inputs) > 2 and follower.inputs[2].name else None
    if y_zero is None:
        raise UnsupportedNodeError(f"Conv {key!r}: {describe(follower)} has no zero point (a uint8 or int8 output "
                                   "with an explicit zero point expected)")
    matched.inputs = [x_q, x_scale, x_zero, w_q, w_scale, w_zero, follower.inputs[1], y_zero, gs.Variable.empty()]
    matched.output = follower.outputs[0]
    return matched


def _match_qlinear_conv(conv: gs.Node, key: str) -> QuantizedConv:
    inputs = list(conv.inputs) + [gs.Variable.empty()] * (9 - len(conv.inputs))
    return QuantizedConv(inputs=inputs[:9], output=conv.outputs[0], replaced=[conv])


def _quantized_bias(surgeon: Surgeon, conv: gs.Node, key: str, x_scale, w_scale):
    """QLinearConv's int32 B: the DequantizeLinear'd int32 bias as it is (its scale must be x_scale *
    w_scale, as ORT's fusion assumes), or a float bias quantized with that scale."""
    if len(conv.inputs) < 3 or not conv.inputs[2].name:
        return gs.Variable.empty()
    bias = conv.inputs[2]
    xs, ws = constant_value(x_scale), constant_value(w_scale)
    if xs is None or ws is None:
        raise UnsupportedNodeError(f"Conv {key!r}: the input or weight scale is not constant")
    expected = (np.float32(xs.reshape(())) * ws.astype(np.float32).reshape(-1)).astype(np.float32)
    dq = _producer(bias, "DequantizeLinear")
    if dq is None:
        value = constant_value(bias)
        if value is None:
            raise UnsupportedNodeError(f"Conv {key!r}: bias {bias.name!r} is neither constant nor dequantized")
        quantized = np.rint(value.astype(np.float64) / expected.astype(np.float64)).astype(np.int32)
        return surgeon.constant(f"{key}.bias_quantized", quantized)
    b_q, b_scale = _folded(surgeon, dq.inputs[0], key, "B"), constant_value(dq.inputs[1])
    if b_q.dtype is not None and np.dtype(b_q.dtype) != np.int32:
        raise UnsupportedNodeError(f"Conv {key!r}: bias {b_q.name!r} is {np.dtype(b_q.dtype)}, expected int32")
    if (b_scale is None or b_scale.size not in (1, expected.size)
            or not np.allclose(np.broadcast_to(b_scale.reshape(-1), expected.shape), expected, rtol=1e-6, atol=0)):
        raise UnsupportedNodeError(f"Conv {key!r}: bias scale {dq.inputs[1].name!r} is not x_scale * w_scale")
    return b_q


def _centre_weights(surgeon: Surgeon, matched: QuantizedConv, key: str) -> None:
    """Weights with a nonzero zero point (int8 or uint8), the same integers in the form the op runs best:
    symmetric int8 ``w - w_zero_point`` where every such value fits int8 (uint8 weights with zero point
    128, which symmetric uint8 quantization writes); otherwise uint8 weights become int8 ``w - 128`` with
    zero point ``w_zero_point - 128`` (the op corrects for a nonzero zero point). Exact either way.
    Anything else is left for :func:`_check_parameters` to accept or refuse."""
    w_tensor, zero_tensor = matched.inputs[3], matched.inputs[5]
    w = None if w_tensor is None else constant_value(w_tensor)
    zero = None if zero_tensor is None else constant_value(zero_tensor)
    if w is None or zero is None or w.dtype not in (np.int8, np.uint8) or zero.dtype != w.dtype or w.ndim != 4:
        return
    if not np.any(zero != 0) and w.dtype == np.int8:
        return
    if zero.size not in (1, w.shape[0]):
        return
    centred = w.astype(np.int16) - zero.astype(np.int16).reshape(-1, 1, 1, 1)
    if centred.min() >= -128 and centred.max() <= 127:
        w, zero = centred.astype(np.int8), np.zeros(zero.shape, np.int8)
    elif w.dtype == np.uint8:
        w, zero = (w.astype(np.int16) - 128).astype(np.int8), (zero.astype(np.int16) - 128).astype(np.int8)
    else:
        return
    matched.inputs[3] = surgeon.constant(f"{key}.w_int8", w)
    matched.inputs[5] = surgeon.constant(f"{key}.w_zero_point", zero)


_EXPECTED = {  # input position -> (name, dtype, per-channel allowed); None: the activations' type
    1: ("x_scale", np.float32, False), 2: ("x_zero_point", None, False),
    3: ("w", np.int8, True), 4: ("w_scale", np.float32, True), 5: ("w_zero_point", np.int8, True),
    6: ("y_scale", np.float32, False), 7: ("y_zero_point", None, False),
}


def activation_type(matched: QuantizedConv) -> np.dtype | None:
    """The activations' type (uint8 or int8 for a matched convolution): the input's, else its zero
    point's (a QDQ model need not declare intermediate types)."""
    x_q, x_zero = matched.inputs[0], matched.inputs[2]
    if x_q.dtype is not None:
        return np.dtype(x_q.dtype)
    zero_value = None if x_zero is None else constant_value(x_zero)
    return None if zero_value is None else zero_value.dtype


def _check_parameters(matched: QuantizedConv, key: str) -> None:
    """The scheme PerforatedQLinearConv runs: constant parameters of the right types, uint8 or int8
    activations (the output of the input's type), int8 weights (after :func:`_centre_weights`),
    per-tensor activation parameters."""
    x_q = matched.inputs[0]
    activations = activation_type(matched)
    if activations is not None and activations not in ACTIVATION_TYPES:
        raise UnsupportedNodeError(f"Conv {key!r}: quantized input {x_q.name!r} is {activations}, expected uint8 or "
                                   "int8 activations")
    if matched.inputs[2] is None:
        raise UnsupportedNodeError(f"Conv {key!r}: the input's DequantizeLinear has no zero point (uint8 or int8 "
                                   "expected)")
    channels = None
    for position, (name, dtype, per_channel) in _EXPECTED.items():
        tensor = matched.inputs[position]
        value = None if tensor is None else constant_value(tensor)
        if value is None:
            if tensor is None or not tensor.name:
                found = "missing"
            elif tensor.inputs:
                found = f"{tensor.name!r}, computed by {describe(tensor.inputs[0])}"
            else:
                found = f"graph input {tensor.name!r}"
            raise UnsupportedNodeError(f"Conv {key!r}: {name} is {found}; expected a constant (an initializer, a "
                                       "Constant node, or a QuantizeLinear of constants)")
        if dtype is None and value.dtype not in ACTIVATION_TYPES:
            raise UnsupportedNodeError(f"Conv {key!r}: {name} {tensor.name!r} is {value.dtype}, expected uint8 or int8")
        if dtype is None and activations is not None and value.dtype != activations:
            raise UnsupportedNodeError(f"Conv {key!r}: {name} {tensor.name!r} is {value.dtype} but the input is "
                                       f"{activations}: input and output must have one type (U8S8 or S8S8)")
        if dtype is None:
            activations = value.dtype
        elif value.dtype != dtype:
            hint = " (quantize weights with weight_type=QInt8)" if name.startswith("w") else ""
            raise UnsupportedNodeError(f"Conv {key!r}: {name} {tensor.name!r} is {value.dtype}, expected "
                                       f"{np.dtype(dtype).name}{hint}")
        if name == "w":
            channels = value.shape[0]
        elif not per_channel and value.size != 1:
            raise UnsupportedNodeError(f"Conv {key!r}: {name} {tensor.name!r} has shape {list(value.shape)}, "
                                       "expected a scalar (per-tensor activation quantization)")
        elif per_channel and value.size not in (1, channels):
            raise UnsupportedNodeError(f"Conv {key!r}: {name} {tensor.name!r} has {value.size} values, expected 1 "
                                       f"or {channels} (one per output channel)")
        if "scale" in name and not np.all(np.isfinite(value) & (value > 0)):
            raise UnsupportedNodeError(f"Conv {key!r}: {name} {tensor.name!r} has non-positive or non-finite values")


__all__ = ["QUANTIZED_OP", "QuantizedConv", "is_quantized", "match", "perforate", "pool_channels_last",
]
