"""The float twin of a QDQ model: the network impact masks differentiate when the model is quantized.

Differentiating a QDQ model as it stands gives nothing: QuantizeLinear rounds, so its true derivative is
zero almost everywhere (and onnx-ad's rules say so), and every impact would be 0. Two ways out, as for
quantization-aware training: a straight-through estimator (STE) through QuantizeLinear, or masks
computed on the float model and carried over. The twin is both at once, chosen because it needs no
gradient rule of ours and keeps everything the quantized network does except the rounding:

- constant weights (a DequantizeLinear of an initializer or Constant, possibly behind a QuantizeLinear)
  become float initializers holding their dequantized INT8 values, so the twin has the weights that run;
- every activation ``QuantizeLinear -> DequantizeLinear`` pair becomes ``Clip`` to the range the pair can
  represent, ``[(qmin - zp) * scale, (qmax - zp) * scale]``. That keeps what ``quantize_static`` folds
  into the quantization range (a Relu after a Conv disappears into a zero point of 0: dropping the pair
  instead would drop the Relu), and Clip's derivative (1 inside the range, 0 outside) is exactly the
  clipped STE's.

So the twin's gradient is the clipped STE's, evaluated at unrounded activations (each off the INT8
network's by at most half a quantization step). Node names and Conv outputs are kept, so the masks
computed on the twin name the QDQ model's Convs; accuracy and speed are still measured on the INT8 model.
QOperator models (QLinearConv) have no float Conv left to differentiate and are refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ops
from .errors import PerforateError
from .graph import constant_node_value, graph_names, node_attributes, producer_nodes, unique_name

__all__ = ["float_twin", "is_qdq"]


def is_qdq(model: onnx.ModelProto) -> bool:
    """True when some Conv reads a DequantizeLinear output (a QDQ-format quantized model)."""
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return any(n.op_type == "Conv" and any(i in produced_by_dq for i in n.input) for n in model.graph.node)


def _refuse_qoperator(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type in ("QLinearConv", "ConvInteger"):
            raise PerforateError(
                f"{node.op_type} node {node.name or node.output[0]!r}: impact masks need a float Conv to "
                "differentiate; quantize in QDQ format (quantize_static(..., quant_format=QuantFormat.QDQ)) or "
                "compute the masks on the float model")


def float_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float network of a QDQ model (see the module docstring); other models are returned unchanged."""
    _refuse_qoperator(model)
    if not is_qdq(model):
        return model
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        value = constant_node_value(node.attribute) if node.op_type == "Constant" else None
        if value is not None:
            constants[node.output[0]] = value
    producers = producer_nodes(twin)
    taken = graph_names(graph)

    def constant(name):
        return constants.get(name) if name else None

    folded, nodes, dropped_quantizers = [], [], set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            nodes.append(node)
            continue
        source, scale, zero = node.input[0], constant(node.input[1]), constant(node.input[2] if len(node.input) > 2 else "")
        quantizer = producers.get(source)
        quantizer = quantizer if quantizer is not None and quantizer.op_type == "QuantizeLinear" else None
        if scale is None:
            nodes.append(node)  # a computed scale: not something quantize_static writes; left to the gradient
            continue
        if source in constants:
            dequantized = ops.dequantize_linear(constants[source], scale, zero, node_attributes(node).get("axis", 1))
            folded.append(numpy_helper.from_array(dequantized, node.output[0]))
        elif quantizer is not None and quantizer.input[0] in constants and constant(quantizer.input[1]) is not None:
            # a constant quantized in the graph
            q_zero = constant(quantizer.input[2]) if len(quantizer.input) > 2 else None
            attrs = node_attributes(quantizer)
            q = ops.quantize_linear(constants[quantizer.input[0]], constant(quantizer.input[1]), q_zero,
                                    attrs.get("axis", 1), attrs.get("output_dtype", 0))
            dequantized = ops.dequantize_linear(q, scale, zero, node_attributes(node).get("axis", 1))
            folded.append(numpy_helper.from_array(dequantized, node.output[0]))
            dropped_quantizers.add(quantizer.output[0])
        elif quantizer is not None:
            if scale.size != 1:
                raise PerforateError(f"DequantizeLinear node {node.name or node.output[0]!r}: per-axis scales on "
                                     f"activation {source!r} are not supported (expected one scale per tensor)")
            zero = np.zeros((), np.uint8) if zero is None else zero
            lo, hi = np.iinfo(zero.dtype).min, np.iinfo(zero.dtype).max
            bounds = [(np.float32(v) - np.float32(zero.ravel()[0])) * np.float32(scale.ravel()[0]) for v in (lo, hi)]
            names = [unique_name(f"{node.output[0]}_clip_{side}", taken) for side in ("min", "max")]
            folded += [numpy_helper.from_array(np.asarray(b, np.float32), n) for b, n in zip(bounds, names)]
            nodes.append(helper.make_node("Clip", [quantizer.input[0], *names], [node.output[0]],
                                          name=node.name or node.output[0]))
            dropped_quantizers.add(quantizer.output[0])
        else:
            nodes.append(node)  # a quantized graph input: nothing to differentiate upstream anyway
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes
             if not (n.op_type == "QuantizeLinear" and n.output[0] in dropped_quantizers and n.output[0] not in used)]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] not in used)]
    initializers = [i for i in graph.initializer if i.name in used] + [i for i in folded if i.name in used]
    # IR < 4 lists every initializer among the graph inputs: drop the removed ones, list the new ones.
    kept, removed = {i.name for i in initializers}, {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name in kept or v.name not in removed]
    if twin.ir_version < 4:
        listed = {v.name for v in inputs}
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in initializers
                   if i.name not in listed]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    present = {o for n in nodes for o in n.output} | used
    kept_info = [v for v in graph.value_info if v.name in present]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return twin
