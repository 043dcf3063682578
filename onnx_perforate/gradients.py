"""dL/dV for chosen tensors V of an ONNX model, computed by ONNX Runtime.

ONNX Runtime has no backward pass, so the derivative is itself written as an ONNX graph:
the model, a loss head, and the reverse-mode derivative that `onnx_ad.reverse` emits as
standard operators. A tensor V is made differentiable by a *tap*: a zero input dV added to
it (V' = V + dV, V's consumers rewired to V'), so that dL/dV = dL/d(dV) at dV = 0. After
differentiation the taps are folded away again, leaving a graph of the model's inputs (plus
the loss target) that returns every V, its gradient and the loss.

An optional *interpolation* index per V turns the graph into a perforated network made of
standard ops (Reshape -> Gather after the tap, ``opset.gather_positions``), so the gradient is the true
derivative of the perforated network: interpolated positions pass their gradient to the
position they copy, and skipped positions get exactly zero.

See docs/gradients.md for the graph layout, the losses and measured costs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ad
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from . import runtime
from .errors import PerforateError
from .graph import (declared_shapes, default_opset, graph_names, load_model, node_attributes, producer_nodes,
                    unique_name)
from .opset import gather_positions

try:  # onnx-ad's rule tables, consulted only to report every gap at once; onnx-ad's own
    # error (the first gap) still applies when its internals move
    from onnx_ad.lower import LOWERINGS as _LOWERED
    from onnx_ad.rules import REVERSE as _REVERSE_RULES
except ImportError:  # pragma: no cover
    _LOWERED, _REVERSE_RULES = {}, None

__all__ = [
    "GradientError",
    "GradientModel",
    "GradientRunner",
    "LOSSES",
    "DEFAULT_LOSS",
    "build_gradient_model",
    "default_session_options",
    "impact_map",
    "prepare_model",
]

LOSSES = ("nll", "self_nll", "kl")
# KL to the unperforated output has an exactly zero gradient at the unperforated network,
# and labels are not always at hand; the model's own top-1 works for any calibration data.
DEFAULT_LOSS = "self_nll"
SCORES = ("auto", "logits", "probabilities", "log_probabilities")

# The reverse rules for MaxPool, Gather & co. are ScatterND with reduction="add" (opset 16).
_MIN_OPSET = 16
_TARGET_OPSET = 17
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                TensorProto.BFLOAT16)
# Ops that move a tensor without changing its values: a Softmax seen through them still
# makes the output a probability distribution.
_VALUE_PRESERVING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


class GradientError(PerforateError):
    """The auxiliary graph cannot be built or run: an op without a reverse rule, a tensor or an
    interpolation index that does not fit, a bad loss or batch."""


@dataclass
class GradientModel:
    """The auxiliary graph and the names of its inputs and outputs.

    Inputs: `inputs` (the model's own, batch fixed to `batch_size`) plus `target` when the
    loss needs one: int64 labels [N] for "nll" (and for "self_nll" with interpolation,
    where the labels must come from the *unperforated* model), float probabilities [N, K]
    for "kl". Outputs: `loss` (a scalar, summed over the batch) and per tensor V
    `values[V]` = V and `grads[V]` = dL/dV, both shaped like V.
    """

    model: onnx.ModelProto
    loss_model: onnx.ModelProto  # the forward graph with the taps as inputs (for checks)
    batch_size: int
    tensors: tuple
    inputs: tuple
    target: str | None
    target_kind: str | None  # "labels", "probabilities" or None
    loss: str
    loss_kind: str
    scores: str  # what the model output was taken to be
    values: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)  # V -> tap input name in loss_model
    shapes: dict = field(default_factory=dict)  # V -> static shape


# --------------------------------------------------------------------------- preparation

def _normalize(model) -> onnx.ModelProto:
    """A copy at opset >= 16, with a valid IR version and no weights posing as inputs."""
    model = load_model(model)  # a private copy
    if default_opset(model) < _MIN_OPSET:
        try:
            model = version_converter.convert_version(model, _TARGET_OPSET)
        except Exception as error:  # the converter's own errors are terse
            raise GradientError(
                "could not convert the model from opset %d to %d (needed for the reverse "
                "rules of MaxPool/Gather): %s" % (default_opset(model), _TARGET_OPSET, error)) from error
    # the converter keeps the old IR version (3 for old Caffe2 exports), which ORT rejects
    # for a new opset
    minimum = helper.find_min_ir_version_for(list(model.opset_import), True)
    model.ir_version = max(model.ir_version, minimum)
    # IR < 4 listed every weight as a graph input; as inputs they are not constants, so
    # the derivative would treat them as variables and ORT would not fold them
    weights = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in weights]
    if len(data) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(data)
    return model


def _fix_batch(model, batch_size) -> onnx.ModelProto:
    """A copy with every input's leading axis set to batch_size, shapes re-inferred.

    `onnx_ad.reverse` needs static shapes; a symbolic batch is refused.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            if batch_size is None:
                dims[0].dim_param = "N"
            else:
                dims[0].dim_value = int(batch_size)
    # declared shapes further down may carry the old batch (SqueezeNet's [1, 1000, 1, 1])
    graph.ClearField("value_info")
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    return shape_inference.infer_shapes(result, strict_mode=False, data_prop=True)


def prepare_model(model, batch_size=None) -> onnx.ModelProto:
    """The model as the auxiliary graph uses it: opset >= 16 (converted to 17 when older),
    IR version fixed, initializers removed from the inputs, and the batch fixed (or made
    symbolic "N" when batch_size is None) with shapes inferred."""
    return _fix_batch(_normalize(model), batch_size)


def _shapes(model) -> dict:
    """name -> (elem_type, dims with None for unknown) for everything inference knows."""
    return declared_shapes(model, symbolic=False)


def _fresh_names(graph):
    """A function stem -> a fresh tensor name that collides with nothing in ``graph``."""
    taken = graph_names(graph)
    return lambda stem: unique_name(stem, taken)


# --------------------------------------------------------------------------- loss head

def _log_probabilities(model, output, scores, fresh, nodes, inits, rename=lambda name: name):
    """Emit nodes computing log-probabilities [N, K] from the model output.

    Returns (name, scores kind). `rename` maps a tensor of `model` to the one the new nodes
    must read (a tapped tensor is read after its tap). A Softmax output is not
    differentiated through Log(p): p underflows to 0 in float32 for confident models, and
    log(0) poisons the gradient, so the Softmax's input gets a LogSoftmax instead
    (mathematically identical)."""
    producers = producer_nodes(model)
    shapes = _shapes(model)
    flat_shape = fresh("logp_shape")
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), flat_shape))

    def flatten(name):
        out = fresh(name + "__flat")
        nodes.append(helper.make_node("Reshape", [name, flat_shape], [out]))
        return out

    source, node = output, producers.get(output)
    while node is not None and node.domain in ("", "ai.onnx") and \
            node.op_type in _VALUE_PRESERVING:
        source = node.input[0]
        node = producers.get(source)
    found = node.op_type if node is not None and node.domain in ("", "ai.onnx") else None

    if scores == "auto":
        scores = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(
            found, "logits")
    if (scores, found) in (("probabilities", "Softmax"), ("log_probabilities", "LogSoftmax")):
        logits = node.input[0]
        rank = len(shapes.get(logits, (None, ()))[1] or ())
        axis = node_attributes(node).get("axis", -1)  # opset >= 13 default
        dims = shapes.get(logits, (None, None))[1]
        if dims is not None and rank:
            axis %= rank
            other = [d for i, d in enumerate(dims) if i not in (0, axis)]
            if axis == 0 or any(d != 1 for d in other):
                raise GradientError(
                    "the model output is a %s over axis %d of a %s tensor, not a class "
                    "distribution per image; pass scores='logits' to treat the output as "
                    "logits" % (found, axis, list(dims)))
        out = fresh("log_probs")
        nodes.append(helper.make_node("LogSoftmax", [rename(logits)], [out], axis=axis))
        return flatten(out), scores
    flat = flatten(output)
    if scores == "log_probabilities":
        return flat, scores
    if scores == "probabilities":  # no Softmax to look through: log of the values as given
        out = fresh("log_probs")
        nodes.append(helper.make_node("Log", [flat], [out]))
        return out, scores
    out = fresh("log_probs")
    nodes.append(helper.make_node("LogSoftmax", [flat], [out], axis=1))
    return out, "logits"


def _loss_head(kind, logp, dtype, batch_size, classes, fresh, nodes, inits, labels_input, temperature=1.0):
    """Emit the loss nodes; returns (loss name, target input ValueInfo or None).

    The loss is the SUM over the batch, so dL/dV of image n is exactly the gradient of
    image n's own loss: images do not interact in an inference graph."""
    target = None
    axes1 = fresh("axes1")
    inits.append(numpy_helper.from_array(np.array([1], np.int64), axes1))
    loss = fresh("loss")
    if kind in ("nll", "self_nll"):
        if labels_input:
            labels = fresh("labels")
            target = helper.make_tensor_value_info(labels, TensorProto.INT64, [batch_size])
        else:  # the model's own top-1; an integer, so no derivative flows through it
            labels = fresh("self_labels")
            nodes.append(helper.make_node("ArgMax", [logp], [labels], axis=1, keepdims=0))
        index = fresh("label_index")
        picked = fresh("label_logp")
        total = fresh("label_logp_sum")
        nodes += [
            helper.make_node("Unsqueeze", [labels, axes1], [index]),
            helper.make_node("GatherElements", [logp, index], [picked], axis=1),
            helper.make_node("ReduceSum", [picked], [total], keepdims=0),
            helper.make_node("Neg", [total], [loss]),
        ]
    elif kind == "kl":
        # KL(q || p) = sum q (log q - log p). The q log q part is a constant; classes with
        # q = 0 must contribute 0, so their log reads log(1) rather than log(0) = -inf
        q = fresh("target_probs")
        target = helper.make_tensor_value_info(q, dtype, [batch_size, classes])
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        zero, one = fresh("zero"), fresh("one")
        inits += [numpy_helper.from_array(np.zeros((), np_dtype), zero),
                  numpy_helper.from_array(np.ones((), np_dtype), one)]
        names = {k: fresh(k) for k in ("q_pos", "q_safe", "log_q", "log_ratio", "kl_terms")}
        kl = loss
        if temperature != 1.0:
            # distillation at a temperature T: both distributions softened (p^(1/T), renormalised:
            # the target comes softened), the KL scaled by T^2 so its gradients keep their size
            t, t2 = fresh("temperature"), fresh("temperature_squared")
            inits += [numpy_helper.from_array(np.array(temperature, np_dtype), t),
                      numpy_helper.from_array(np.array(temperature ** 2, np_dtype), t2)]
            scaled, softened, kl = fresh("logp_over_t"), fresh("logp_softened"), fresh("kl_softened")
            nodes += [helper.make_node("Div", [logp, t], [scaled]),
                      helper.make_node("LogSoftmax", [scaled], [softened], axis=1)]
            logp = softened
        nodes += [
            helper.make_node("Greater", [q, zero], [names["q_pos"]]),
            helper.make_node("Where", [names["q_pos"], q, one], [names["q_safe"]]),
            helper.make_node("Log", [names["q_safe"]], [names["log_q"]]),
            helper.make_node("Sub", [names["log_q"], logp], [names["log_ratio"]]),
            helper.make_node("Mul", [q, names["log_ratio"]], [names["kl_terms"]]),
            helper.make_node("ReduceSum", [names["kl_terms"]], [kl], keepdims=0),
        ]
        if temperature != 1.0:
            nodes.append(helper.make_node("Mul", [kl, t2], [loss]))
    else:
        raise GradientError("loss must be one of %s, not %r" % (LOSSES, kind))
    return loss, target


# --------------------------------------------------------------------------- interpolation

def _check_index(name, index, shape):
    """Validate one interpolation index against V's static shape [N, C, Ho, Wo]."""
    if shape is None or len(shape) != 4 or None in shape:
        raise GradientError("interpolation needs a 4-D tensor of known shape; '%s' has %s"
                            % (name, shape))
    ho, wo = shape[2], shape[3]
    index = np.asarray(index)
    if index.shape != (ho, wo):
        raise GradientError("interpolation index for '%s' has shape %s, the tensor has a %dx%d "
                         "grid" % (name, index.shape, ho, wo))
    if not np.issubdtype(index.dtype, np.integer):
        raise GradientError("interpolation index for '%s' must be integer, not %s"
                         % (name, index.dtype))
    flat = index.reshape(-1).astype(np.int64)
    if flat.min() < 0 or flat.max() >= ho * wo:
        raise GradientError("interpolation index for '%s' has positions outside [0, %d)"
                         % (name, ho * wo))
    # a source must be a computed position, and a computed position fills itself
    if np.any(flat[flat] != flat):
        bad = int(np.flatnonzero(flat[flat] != flat)[0])
        raise GradientError("interpolation index for '%s': position %d copies position %d, "
                         "which is itself not computed (it copies %d)"
                         % (name, bad, flat[bad], flat[flat[bad]]))
    return flat


# --------------------------------------------------------------------------- the graphs

def _on_path(model, starts, end, types):
    """Nodes lying between the taps and the loss, along floating-point values."""
    nodes = list(model.graph.node)
    live = set(starts)
    forward = set()
    for i, node in enumerate(nodes):
        if any(n in live for n in node.input):
            forward.add(i)
            live.update(o for o in node.output
                        if o and types.get(o, (TensorProto.FLOAT,))[0] in _FLOAT_TYPES)
    needed = {end}
    path = []
    for i in reversed(range(len(nodes))):
        if any(o in needed for o in nodes[i].output):
            needed.update(n for n in nodes[i].input if n)
            if i in forward:
                path.append(nodes[i])
    return path[::-1]


def _differentiable(node, opset) -> bool:
    """Whether onnx-ad has a reverse rule for the node, directly or after it expands a
    spec-defined function, lowers the op or unrolls a recurrent op."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if _REVERSE_RULES is None or node.op_type in _REVERSE_RULES or \
            node.op_type in _LOWERED or node.op_type in ("RNN", "GRU", "LSTM"):
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=opset)
    except Exception:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


@dataclass
class LossGraph:
    """The forward auxiliary graph: the model with a tap input per V (and the Gathers of the
    interpolation), the loss head, and the loss and every V as outputs; and its tensor names."""

    model: onnx.ModelProto
    tensors: tuple  # the V, in order
    inputs: tuple  # the model's own data inputs
    taps: dict  # V -> its tap input dV
    tapped: dict  # V -> V + dV
    values: dict  # V -> the output returning V
    shapes: dict  # V -> static shape
    loss: str
    scores: str  # what the model output was taken to be
    target: str | None  # the target input, when the loss takes one
    target_kind: str | None  # "labels", "probabilities" or None


@dataclass
class _Tapping:
    """What the taps and the interpolation add around each V."""

    taps: dict = field(default_factory=dict)
    tapped: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    tap_inputs: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    rewired: dict = field(default_factory=dict)  # V -> (what V's consumers now read, nodes after V)

    def read(self, name: str) -> str:
        """The tensor that a reader of ``name`` now reads."""
        return self.rewired.get(name, (name,))[0]


def _check_request(model, tensors, batch_size, interpolation, output, types) -> tuple[tuple, dict, str]:
    """The tensors, interpolation and output the loss graph is built for, checked."""
    graph = model.graph
    produced = {o for n in graph.node for o in n.output}
    tensors = tuple(tensors)
    if not tensors:
        raise GradientError("no tensors to differentiate")
    if len(set(tensors)) != len(tensors):
        raise GradientError("tensors are listed twice: %s" % list(tensors))
    for name in tensors:
        if name not in produced:
            raise GradientError("'%s' is not a tensor computed by a node of the model" % name)
        elem, dims = types.get(name, (None, None))
        if elem is not None and elem not in _FLOAT_TYPES:
            raise GradientError("'%s' is not a floating-point tensor" % name)
        if dims is None or None in dims:
            raise GradientError("the shape of '%s' could not be inferred at batch size %d"
                                % (name, batch_size))
    interpolation = dict(interpolation or {})
    for name in interpolation:  # perforated tensors need not be differentiated ones
        if name not in produced:
            raise GradientError("interpolation given for '%s', which is not a tensor computed "
                                "by a node of the model" % name)
    outputs = [o.name for o in graph.output]
    output = output or next(o.name for o in graph.output
                            if o.type.tensor_type.elem_type in _FLOAT_TYPES)
    if output not in outputs:
        raise GradientError("'%s' is not a model output (outputs: %s)" % (output, outputs))
    return tensors, interpolation, output


def _tap_and_interpolate(tensors, interpolation, types, fresh) -> _Tapping:
    """The tap Add after every V, and the Reshape -> Gather -> Reshape of every perforated one."""
    t = _Tapping()
    for name in list(tensors) + [v for v in interpolation if v not in tensors]:
        elem, dims = types.get(name, (None, None))
        used, after = name, []
        if name in tensors:
            t.shapes[name] = dims
            t.taps[name], t.tapped[name] = fresh(name + "__tap"), fresh(name + "__tapped")
            t.tap_inputs.append(helper.make_tensor_value_info(t.taps[name], elem, list(dims)))
            after.append(helper.make_node("Add", [name, t.taps[name]], [t.tapped[name]],
                                          name=fresh(name + "__tap_add")))
            used = t.tapped[name]
            t.values[name] = fresh(name + "__value")
        if name in interpolation:
            flat = _check_index(name, interpolation[name], dims)
            idx, perforated = fresh(name + "__interp_index"), fresh(name + "__perforated")
            t.initializers.append(numpy_helper.from_array(flat.reshape(dims[2:]), idx))
            # the same Gather as the portable form's PerforatedConv + NNInterpolate (opset.py)
            after += gather_positions(used, idx, perforated, fresh)
            used = perforated
        t.rewired[name] = (used, after)
    return t


def _rewired_nodes(graph, tapping: _Tapping) -> list:
    """The model's nodes reading every V after its tap, each V's new nodes right after its producer
    (so the node list stays sorted); the taps themselves read the original V."""
    nodes = []
    for node in graph.node:
        node = _copy_node(node)
        for i, inp in enumerate(node.input):
            node.input[i] = tapping.read(inp)
        nodes.append(node)
        for out in node.output:
            if out in tapping.rewired:
                nodes.extend(tapping.rewired[out][1])
    return nodes


def _loss_model(model, tensors, batch_size, loss, interpolation, output, scores, temperature=1.0) -> LossGraph:
    """The forward auxiliary graph, built in steps: check the request, tap (and interpolate) every V,
    rewire its readers, add the loss head, then declare the inputs and outputs."""
    types = _shapes(model)
    tensors, interpolation, output = _check_request(model, tensors, batch_size, interpolation, output, types)
    fresh = _fresh_names(model.graph)
    tapping = _tap_and_interpolate(tensors, interpolation, types, fresh)
    nodes = _rewired_nodes(model.graph, tapping)

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    head, inits = [], list(tapping.initializers)
    out_name = tapping.read(output)  # an output that is a V itself is read after its tap too
    logp, scores = _log_probabilities(result, out_name, scores, fresh, head, inits, tapping.read)
    classes = _classes(result, out_name, types.get(output))
    labels_input = loss == "nll" or (loss == "self_nll" and bool(interpolation))
    dtype = types.get(output, (TensorProto.FLOAT,))[0]
    loss_name, target = _loss_head(loss, logp, dtype, batch_size, classes, fresh, head, inits, labels_input,
                                   temperature)
    head += [helper.make_node("Identity", [name], [tapping.values[name]]) for name in tensors]

    graph.ClearField("node")
    graph.node.extend(nodes + head)
    graph.initializer.extend(inits)
    data_inputs = tuple(i.name for i in graph.input)
    if target is not None:
        graph.input.append(target)
    graph.input.extend(tapping.tap_inputs)
    graph.ClearField("output")
    graph.output.append(helper.make_tensor_value_info(loss_name, dtype, []))
    for name in tensors:
        graph.output.append(helper.make_tensor_value_info(tapping.values[name], types[name][0],
                                                          list(tapping.shapes[name])))
    graph.ClearField("value_info")
    return LossGraph(
        model=shape_inference.infer_shapes(result, strict_mode=False, data_prop=True),
        tensors=tensors, inputs=data_inputs, taps=tapping.taps, tapped=tapping.tapped, values=tapping.values,
        shapes=tapping.shapes, loss=loss_name, scores=scores, target=None if target is None else target.name,
        target_kind=None if target is None else ("labels" if loss != "kl" else "probabilities"))


def _classes(model, output, declared):
    """K, the number of classes per image, from the output's static shape."""
    dims = _shapes(model).get(output, declared or (None, None))[1]
    if dims is None or None in dims[1:] or not dims:
        raise GradientError("the shape of the model output '%s' could not be inferred"
                            % output)
    return int(np.prod(dims[1:], dtype=np.int64))


def _copy_node(node):
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def build_gradient_model(model, tensors: Sequence[str], batch_size: int,
                         loss: str = DEFAULT_LOSS,
                         interpolation: Mapping[str, np.ndarray] | None = None, *,
                         output: str | None = None, scores: str = "auto",
                         temperature: float = 1.0) -> GradientModel:
    """The auxiliary graph returning every V in `tensors`, dL/dV and the loss.

    `model`: ModelProto or path. `batch_size`: fixed batch (the derivative needs static
    shapes). `loss`: "self_nll" (default), "nll" or "kl" (see the module docs).
    `interpolation`: {V: int64 index [Ho, Wo]} describing a perforated V: the value used at
    (i, j) is V at flat row-major position index[i, j] of the full Ho x Wo grid, i.e. at
    (index // Wo, index % Wo); computed positions hold their own flat position. `output`:
    which model output to build the loss on (default: the first floating-point one).
    `scores`: "auto" detects a Softmax/LogSoftmax at the end of the model, or force
    "logits", "probabilities" or "log_probabilities". `temperature` ("kl" only): the KL of the
    distributions softened by it (the model's in the graph, the target by the caller: q^(1/T),
    renormalised), times T^2; 1 is the plain KL.
    """
    if loss not in LOSSES:
        raise GradientError("loss must be one of %s, not %r" % (LOSSES, loss))
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (np.isfinite(temperature) and temperature > 0)):
        raise GradientError("temperature must be a positive number, not %r" % (temperature,))
    if temperature != 1.0 and loss != "kl":
        raise GradientError("a temperature softens the target distribution of loss 'kl'; loss %r has "
                            "none" % (loss,))
    if scores not in SCORES:
        raise GradientError("scores must be one of %s, not %r" % (SCORES, scores))
    if int(batch_size) < 1:
        raise GradientError("batch_size must be positive")
    prepared = _fix_batch(_normalize(model), int(batch_size))
    return _build(prepared, tensors, int(batch_size), loss, interpolation, output, scores, float(temperature))


def _build(prepared, tensors, batch_size, loss, interpolation, output, scores, temperature=1.0):
    meta = _loss_model(prepared, tensors, batch_size, loss, interpolation, output, scores, temperature)
    forward = meta.model
    taps = [meta.taps[v] for v in meta.tensors]
    types = _shapes(forward)
    opset = default_opset(forward)
    missing = [n for n in _on_path(forward, taps, meta.loss, types)
               if not _differentiable(n, opset)]
    if missing:
        raise GradientError(
            "onnx-ad cannot differentiate %d node(s) between the tapped tensors and the "
            "loss: %s" % (len(missing), ", ".join(
                "%s%s '%s'" % (n.domain + "." if n.domain else "", n.op_type,
                               n.name or n.output[0]) for n in missing)))
    try:
        derivative = onnx_ad.reverse(forward, inputs=taps, outputs=[meta.loss], layout="onnx")
    except onnx_ad.UnsupportedOperator as error:
        raise GradientError("onnx-ad cannot differentiate the model: %s" % error) from error
    model, grads = _finish(derivative, forward, meta, taps)
    return GradientModel(model=model, loss_model=forward, batch_size=batch_size,
                         tensors=meta.tensors, inputs=meta.inputs,
                         target=meta.target, target_kind=meta.target_kind,
                         loss=meta.loss, loss_kind=loss, scores=meta.scores,
                         values=dict(meta.values), grads=grads, taps=dict(meta.taps),
                         shapes=dict(meta.shapes))


def _finish(derivative, forward, meta: LossGraph, taps):
    """Turn onnx-ad's (x, dV, seed) -> (loss, V, adj_dV) into (x, target) -> (loss, V, dL/dV)."""
    graph = derivative.graph
    n_in = len(forward.graph.input)
    n_out = len(forward.graph.output)
    seeds = list(graph.input[n_in:])
    adjoints = [o.name for o in graph.output[n_out:]]
    if len(seeds) != 1 or len(adjoints) != len(taps):  # onnx-ad's documented signature
        raise GradientError("unexpected derivative signature: seeds %s, adjoints %s"
                            % ([i.name for i in seeds], adjoints))
    fresh = _fresh_names(graph)
    value_types = {o.name: o.type.tensor_type.elem_type for o in forward.graph.output}
    # the seed dL/dL = 1 (one seed direction: shape [1]) becomes a constant
    seed = seeds[0].name
    elem = seeds[0].type.tensor_type.elem_type
    graph.initializer.append(numpy_helper.from_array(
        np.ones([1], helper.tensor_dtype_to_np_dtype(elem)), seed))
    # taps are zero: V' = V + 0 is V itself; anything else reading a tap (a Shape, say)
    # gets explicit zeros
    tap_set = set(taps)
    tapped = {meta.taps[v]: (v, meta.tapped[v]) for v in meta.tensors}
    nodes = []
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and node.input[1] in tap_set and \
                node.output[0] == tapped[node.input[1]][1]:
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]]))
        else:
            nodes.append(node)
    still_read = {i for n in nodes for i in n.input} & tap_set
    zeros = []
    for tap in still_read:
        v = tapped[tap][0]
        shape = fresh(tap + "__shape")
        graph.initializer.append(numpy_helper.from_array(
            np.array(meta.shapes[v], np.int64), shape))
        zero = helper.make_tensor("zero", value_types[meta.values[v]], [1], [0])
        zeros.append(helper.make_node("ConstantOfShape", [shape], [tap], value=zero))
    # drop the trailing seed axis of each adjoint: [N, C, H, W, 1] -> [N, C, H, W]
    last = fresh("seed_axis")
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), last))
    grads, tail = {}, []
    for v, adjoint in zip(meta.tensors, adjoints):
        grads[v] = fresh(v + "__grad")
        tail.append(helper.make_node("Squeeze", [adjoint, last], [grads[v]]))
    graph.ClearField("node")
    graph.node.extend(zeros + nodes + tail)
    keep = [i for i in graph.input if i.name not in tap_set and i.name != seed]
    del graph.input[:]
    graph.input.extend(keep)
    outputs = list(graph.output[:n_out])
    del graph.output[:]
    graph.output.extend(outputs)
    for v in meta.tensors:
        graph.output.append(helper.make_tensor_value_info(
            grads[v], value_types[meta.values[v]], list(meta.shapes[v])))
    return derivative, grads


# --------------------------------------------------------------------------- running

def default_session_options(threads: int | None = None):
    """The package's session options (:func:`onnx_perforate.runtime.session_options`) without the
    custom-op library: the auxiliary graph is standard ONNX. ``threads`` None: ORT's default."""
    return runtime.session_options(threads, custom_ops=False, allow_spinning=None)


def impact_map(value, grad) -> np.ndarray:
    """G(x, y) = sum over channels t of |dL/dV * V|, averaged over the images of a batch:
    [N, C, H, W] -> [H, W] float64."""
    product = np.abs(np.asarray(grad, np.float64) * np.asarray(value, np.float64))
    return product.sum(axis=1).mean(axis=0)


class GradientRunner:
    """Runs the auxiliary graph with ONNX Runtime, one graph and session per batch size.

    `run(feeds, target)` returns {V: (value, grad)} for a batch; `impact(batches)` averages
    the impact map over images. The loss is summed over the batch, so every image's grad is
    the gradient of its own loss, whatever the batch size.
    """

    def __init__(self, model, tensors: Sequence[str], loss: str = DEFAULT_LOSS,
                 interpolation: Mapping[str, np.ndarray] | None = None,
                 session_options=None, providers=None, *, output: str | None = None,
                 scores: str = "auto"):
        if loss not in LOSSES:
            raise GradientError("loss must be one of %s, not %r" % (LOSSES, loss))
        if scores not in SCORES:
            raise GradientError("scores must be one of %s, not %r" % (SCORES, scores))
        self.model = _normalize(model)  # opset conversion once, not per batch size
        self.tensors = tuple(tensors)
        self.loss = loss
        self.interpolation = {k: np.asarray(v) for k, v in (interpolation or {}).items()}
        self.session_options = session_options or default_session_options()
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.output = output
        self.scores = scores
        self._graphs = {}      # batch size -> (GradientModel, InferenceSession)
        self._references = {}  # batch size -> (InferenceSession, input names, output name)

    def gradient_model(self, batch_size: int) -> GradientModel:
        return self._get(batch_size)[0]

    def _get(self, batch_size):
        if batch_size not in self._graphs:
            import onnxruntime as ort
            prepared = _fix_batch(self.model, batch_size)
            gm = _build(prepared, self.tensors, batch_size, self.loss, self.interpolation,
                        self.output, self.scores)
            session = ort.InferenceSession(gm.model.SerializeToString(), self.session_options,
                                           providers=self.providers)
            self._graphs[batch_size] = (gm, session)
        return self._graphs[batch_size]

    def _reference(self, batch_size, feeds):
        """Log-probabilities [N, K] of the original (unperforated) model: the targets of
        "kl", and the labels of "self_nll" when the graph itself is perforated."""
        if batch_size not in self._references:
            import onnxruntime as ort
            prepared = _fix_batch(self.model, batch_size)
            graph = prepared.graph
            fresh = _fresh_names(graph)
            output = self.output or next(o.name for o in graph.output if
                                         o.type.tensor_type.elem_type in _FLOAT_TYPES)
            nodes, inits = [], []
            logp, _ = _log_probabilities(prepared, output, self.scores, fresh, nodes, inits)
            graph.node.extend(nodes)
            graph.initializer.extend(inits)
            del graph.output[:]
            graph.output.append(helper.make_tensor_value_info(logp, TensorProto.FLOAT, None))
            session = ort.InferenceSession(prepared.SerializeToString(), self.session_options,
                                           providers=self.providers)
            self._references[batch_size] = (session, [i.name for i in graph.input], logp)
        session, names, logp = self._references[batch_size]
        return session.run([logp], {k: feeds[k] for k in names})[0]

    def resolve_target(self, feeds: Mapping[str, np.ndarray], target=None):
        """The target the graph is fed for this batch: `target` checked and converted, or,
        when omitted, computed by a forward run of the original (unperforated) model --
        its distribution for "kl", its top-1 labels for "self_nll" on a perforated graph.
        None when the graph takes no target."""
        return self._target(self._get(self._batch_size(feeds))[0], feeds, target)

    def _target(self, gm, feeds, target):
        if gm.target is None:
            if target is not None:
                raise GradientError("loss 'self_nll' labels every image with the model's own "
                                 "top-1 class; pass labels with loss='nll'")
            return None
        n = gm.batch_size
        if target is None:
            if self.loss == "nll":
                raise GradientError("loss 'nll' needs integer labels: run(feeds, target=labels)")
            logp = self._reference(n, feeds).astype(np.float64)
            if self.loss == "self_nll":
                target = logp.argmax(axis=1)
            else:
                target = np.exp(logp - logp.max(axis=1, keepdims=True))
                target /= target.sum(axis=1, keepdims=True)
        if gm.target_kind == "labels":
            target = np.asarray(target).reshape(-1).astype(np.int64)
            if target.shape != (n,):
                raise GradientError("expected %d labels, got %d" % (n, target.size))
        else:
            target = np.asarray(target, np.float32).reshape(n, -1)
        return target

    def run(self, feeds: Mapping[str, np.ndarray], target=None, return_loss: bool = False):
        """{V: (value, grad)} for one batch; with return_loss, also the summed loss.

        `target`: int64 labels [N] for "nll"; for "kl" optional probabilities [N, K] of the
        original model (computed by a forward run of it when omitted); "self_nll" takes
        none."""
        batch_size = self._batch_size(feeds)
        gm, session = self._get(batch_size)
        inputs = {}
        for name in gm.inputs:
            if name not in feeds:
                raise GradientError("missing input '%s'" % name)
            inputs[name] = feeds[name]
        target = self._target(gm, inputs, target)
        if target is not None:
            inputs[gm.target] = target
        names = [gm.loss] + [gm.values[v] for v in gm.tensors] + [gm.grads[v] for v in gm.tensors]
        results = session.run(names, inputs)
        k = len(gm.tensors)
        out = {v: (results[1 + i], results[1 + k + i]) for i, v in enumerate(gm.tensors)}
        return (out, float(results[0])) if return_loss else out

    def _batch_size(self, feeds):
        gm_inputs = [i.name for i in self.model.graph.input]
        sizes = {np.shape(feeds[name])[0] for name in gm_inputs if name in feeds
                 and np.ndim(feeds[name])}
        if len(sizes) != 1:
            raise GradientError("cannot tell the batch size from the feeds (leading sizes: %s)"
                             % sorted(sizes))
        return int(sizes.pop())

    def impact(self, batches: Iterable) -> dict:
        """{V: G [Ho, Wo] float64}: G = sum_t |dL/dV * V| averaged over every image.

        Each item of `batches` is a feeds dict, or a (feeds, target) pair (labels for
        "nll"). Images are weighted equally, whatever the batch sizes."""
        totals, count = {}, 0
        for item in batches:
            feeds, target = item if isinstance(item, tuple) else (item, None)
            results = self.run(feeds, target)
            for v, (value, grad) in results.items():
                n = value.shape[0]
                total = impact_map(value, grad) * n
                totals[v] = totals[v] + total if v in totals else total
            count += n
        if not count:
            raise GradientError("no data")
        return {v: total / count for v, total in totals.items()}
