"""The ``onnx_perforate`` operator set as data: one :class:`OperatorDefinition` per op and version.

Each definition carries what the ONNX ecosystem needs to understand a node without our library:
inputs, outputs and attributes with their defaults (an ONNX ``OpSchema``), type and shape inference,
and the standard-ONNX body of the op (a model-local function, see ``portable.py``). Adding an op is
one entry in :data:`OPERATORS`. docs/ops.md is the prose specification of the same ops.

:func:`register_schemas` registers the schemas with onnx (done on import of the package), after which
``onnx.shape_inference.infer_shapes`` and ``onnx.checker.check_model(full_check=True)`` check and
infer perforated models. Only onnx, numpy, the library helpers and ops.py (the ops' arithmetic) are
imported here: registering is cheap and needs neither onnx-graphsurgeon nor onnx-ad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from ._library import DOMAIN, OPSET_VERSION
from .ops import ACTIVATIONS, FLOAT32_MAX, POOL_MODES, QUANTIZED_ACTIVATIONS, conv_output_size, pool_output_size

COMPACT_POOL_MODES = tuple(POOL_MODES.values())

_ATTRIBUTE_TYPES = {
    "int": OpSchema.AttrType.INT,
    "ints": OpSchema.AttrType.INTS,
    "float": OpSchema.AttrType.FLOAT,
    "string": OpSchema.AttrType.STRING,
}


@dataclass(frozen=True)
class Parameter:
    """An input or output: ``type`` is a type constraint name of the op or a type such as tensor(int64)."""

    name: str
    type: str
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Attribute:
    """An attribute; ``default`` None means no default: optional (derived from the inputs), or
    ``required``."""

    name: str
    type: str  # "int" | "ints" | "float" | "string"
    default: object
    doc: str
    required: bool = False


@dataclass(frozen=True)
class OperatorDefinition:
    """One op of the domain at one version.

    ``infer(node)`` receives a :class:`InferenceNode` and sets the output types. ``function(None,
    opset)`` returns the op's standard-ONNX body as a FunctionProto at the model's default opset, valid
    for every node of the op (the portable form's model-local function); ``function(node, opset)``
    returns one for that node's attributes only, in plain numeric ops, whose ``overload`` names the
    variant (what the expanded form inlines). Both raise ValueError for a node they cannot serve."""

    name: str
    since_version: int
    doc: str
    inputs: tuple[Parameter, ...]
    outputs: tuple[Parameter, ...]
    type_constraints: tuple[tuple[str, tuple[str, ...], str], ...]
    attributes: tuple[Attribute, ...]
    infer: Callable[["InferenceNode"], None]
    function: Callable[[onnx.NodeProto | None, int], onnx.FunctionProto]

    def default(self, name: str):
        return next(a.default for a in self.attributes if a.name == name)

    def schema(self) -> OpSchema:
        def parameter(p: Parameter) -> OpSchema.FormalParameter:
            option = OpSchema.FormalParameterOption.Optional if p.optional else OpSchema.FormalParameterOption.Single
            return OpSchema.FormalParameter(p.name, p.type, p.doc, param_option=option)

        attributes = []
        for a in self.attributes:
            if a.default is None:
                attributes.append(OpSchema.Attribute(a.name, _ATTRIBUTE_TYPES[a.type], a.doc, required=a.required))
            else:
                attributes.append(OpSchema.Attribute(a.name, helper.make_attribute(a.name, a.default), a.doc))
        schema = OpSchema(
            self.name, DOMAIN, self.since_version, self.doc,
            inputs=[parameter(p) for p in self.inputs],
            outputs=[parameter(p) for p in self.outputs],
            type_constraints=[(name, list(types), doc) for name, types, doc in self.type_constraints],
            attributes=attributes,
        )
        definition = self

        def infer(ctx) -> None:
            definition.infer(InferenceNode(ctx, definition))

        schema.set_type_and_shape_inference_function(infer)
        return schema


# ----------------------------------------------------------------------------------------------------
# Shape inference


class InferenceNode:
    """What an inference function needs from onnx's InferenceContext, in plain Python values."""

    def __init__(self, ctx, definition: OperatorDefinition):
        self.ctx = ctx
        self.definition = definition

    def fail(self, message: str):
        raise onnx.shape_inference.InferenceError(f"{self.ctx.get_display_name()}: {message}")

    def present(self, index: int) -> bool:
        return index < self.ctx.get_num_inputs() and self.ctx.has_input(index)

    def input_name(self, index: int) -> str:
        return self.definition.inputs[index].name

    def elem_type(self, index: int) -> int:
        kind = self.ctx.get_input_type(index) if self.present(index) else None
        return kind.tensor_type.elem_type if kind is not None and kind.HasField("tensor_type") else 0

    def shape(self, index: int, rank: int | None = None) -> list | None:
        """Dims of input ``index`` (int, symbolic name, or None when unknown); None when absent or of
        unknown rank. With ``rank``, a known rank other than it fails inference."""
        kind = self.ctx.get_input_type(index) if self.present(index) else None
        if kind is None or not kind.HasField("tensor_type") or not kind.tensor_type.HasField("shape"):
            return None
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.tensor_type.shape.dim
        ]
        if rank is not None and len(dims) != rank:
            self.fail(f"input {self.input_name(index)} has rank {len(dims)} {dims}, expected rank {rank}")
        return dims

    def constant(self, index: int) -> np.ndarray | None:
        data = self.ctx.get_input_data(index) if self.present(index) else None
        return None if data is None else numpy_helper.to_array(data)

    def attribute(self, name: str):
        proto = self.ctx.get_attribute(name)
        if proto is None:
            return self.definition.default(name)
        value = helper.get_attribute_value(proto)
        return value.decode() if isinstance(value, bytes) else value

    def set_output(self, index: int, elem_type: int, dims: list) -> None:
        self.ctx.set_output_type(index, helper.make_tensor_type_proto(elem_type or TensorProto.FLOAT, dims))


def _known(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _infer_perforated_conv(node: InferenceNode) -> None:
    _infer_perforated_convolution(node, x_input=0, w_input=1, b_input=2, mask_input=3, index_input=4,
                                  activations=ACTIVATIONS)


def _infer_perforated_qlinear_conv(node: InferenceNode) -> None:
    _infer_perforated_convolution(node, x_input=0, w_input=3, b_input=8, mask_input=9, index_input=10,
                                  activations=QUANTIZED_ACTIVATIONS, row_input=True)


def _infer_perforated_convolution(node: InferenceNode, *, x_input, w_input, b_input, mask_input, index_input,
                                  activations, row_input=False) -> None:
    """PerforatedConv's checks and output, for the float op and the quantized one (input positions differ;
    ``row_input``: a 3-D X without X_index is one row [N, C, 1, K], PerforatedQLinearConv's)."""
    compact = node.present(index_input)
    x = node.shape(x_input, None if row_input and not compact else 3 if compact else 4)
    if x is not None and not compact and len(x) not in ((3, 4) if row_input else (4,)):
        node.fail(f"input {node.input_name(x_input)} has rank {len(x)} {x}, expected rank 4 (or 3: one row)")
    if x is not None and not compact and len(x) == 3:
        x = [x[0], x[1], 1, x[2]]
    w = node.shape(w_input, 4)
    group = int(node.attribute("group"))
    if group < 1:
        node.fail(f"group must be positive, got {group}")
    channels, outputs = (x[1] if x else None), (w[0] if w else None)
    if w and _known(channels, w[1]) and channels != w[1] * group:
        node.fail(f"X has {channels} channels but W {w} with group {group} expects {w[1] * group}")
    if _known(outputs) and outputs % group:
        node.fail(f"group {group} does not divide W's {outputs} output channels")
    if node.present(b_input):
        b = node.shape(b_input, 1)
        if b and _known(b[0], outputs) and b[0] != outputs:
            node.fail(f"B has shape {b}, expected [{outputs}] (W's output channels)")
    kernel = node.attribute("kernel_shape")
    if kernel is not None and w and _known(*w[2:]) and list(kernel) != w[2:]:
        node.fail(f"kernel_shape {list(kernel)} does not match W's spatial shape {w[2:]}")
    kernel = list(kernel) if kernel is not None else (w[2:] if w else None)
    activation = node.attribute("activation")
    if activation not in activations:
        node.fail(f"unknown activation {activation!r}; expected one of {activations}")

    mask_shape = node.shape(mask_input, 2)
    if compact:
        index_shape = node.shape(index_input, 2)
        if node.elem_type(index_input) not in (0, TensorProto.INT64):
            node.fail("X_index must be int64")
        spatial = index_shape
    else:
        spatial = x[2:] if x else None
    if mask_shape and spatial and kernel and _known(*mask_shape, *spatial, *kernel):
        expected = list(conv_output_size(spatial, kernel, node.attribute("strides"), node.attribute("pads"),
                                         node.attribute("dilations")))
        if mask_shape != expected:
            node.fail(f"mask has shape {mask_shape}, expected the convolution's output size {expected}")
    mask = node.constant(mask_input)
    computed = None
    if mask is not None:
        computed = int(np.count_nonzero(mask))
        if computed == 0:
            node.fail("mask has no nonzero entry (K = 0)")
    node.set_output(0, node.elem_type(x_input), [x[0] if x else None, outputs, computed])


def _infer_nn_interpolate(node: InferenceNode) -> None:
    yc = node.shape(0, 3)
    index = node.shape(1, 2)
    values = node.constant(1)
    if values is not None and values.size and yc and _known(yc[2]):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= yc[2]:
            node.fail(f"index values lie in [{low}, {high}], outside [0, {yc[2]}) (K of Yc)")
    node.set_output(0, node.elem_type(0), [yc[0] if yc else None, yc[1] if yc else None,
                                          *(index if index else [None, None])])


def _infer_compact_pool(node: InferenceNode) -> None:
    x = node.shape(0, 3)
    index = node.shape(1, 2)
    mode = node.attribute("mode")
    if mode not in COMPACT_POOL_MODES:
        node.fail(f"mode {mode!r}: expected one of {COMPACT_POOL_MODES}")
    kernel, strides, pads, dilations = (list(node.attribute(a)) for a in ("kernel_shape", "strides", "pads", "dilations"))
    if len(kernel) != 2 or len(strides) != 2 or len(pads) != 4 or len(dilations) != 2:
        node.fail(f"kernel_shape, strides, dilations need 2 values and pads 4; got {kernel}, {strides}, "
                  f"{dilations}, {pads}")
    if mode == "average" and dilations != [1, 1]:
        node.fail(f"average pooling takes no dilations, got {dilations}")
    if mode == "average" and node.elem_type(0) not in (0, TensorProto.FLOAT):
        node.fail("average pooling of an 8-bit X is not supported (it needs a requantization); expected mode 'max'")
    if any(p >= k for p, k in zip(pads, kernel * 2)):
        node.fail(f"pads {pads} must each be smaller than the window {kernel}")
    batch, channels = (x[0], x[1]) if x else (None, None)
    if node.present(2):
        positions = node.shape(2, 1)
        node.set_output(0, node.elem_type(0), [batch, channels, positions[0] if positions else None])
        return
    out = [None, None]
    if index and _known(*index):
        ceil_mode = int(node.attribute("ceil_mode"))
        out = [pool_output_size(index[a], kernel[a], strides[a], pads[a], pads[a + 2], dilations[a], ceil_mode)
               for a in range(2)]
        if min(out) < 1:
            node.fail(f"the pooling window does not fit the input grid {index}")
    node.set_output(0, node.elem_type(0), [batch, channels, *out])


# ----------------------------------------------------------------------------------------------------
# Standard-ONNX bodies (the portable form; the gradient graph of gradients.py uses the same Gathers)


def gather_positions(source: str, positions: str, output: str, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
    """Standard-ONNX nodes reading positions of ``source`` [N, C, H, W] (or [N, C, K]): ``output`` is
    ``source`` flattened to [N, C, H*W] and gathered on axis 2 with the int64 ``positions``, whose
    shape replaces that axis ([K] for a perforated Conv's computed positions, [Ho, Wo] for a
    nearest-neighbour fill). ``fresh(stem)`` names the intermediate tensors."""
    shape, flat = fresh(f"{source}__flat_shape"), fresh(f"{source}__flat")
    return [
        helper.make_node("Constant", [], [shape], value=numpy_helper.from_array(np.array([0, 0, -1], np.int64))),
        helper.make_node("Reshape", [source, shape], [flat]),
        helper.make_node("Gather", [flat, positions], [output], axis=2),
    ]


def nearest_fill(compact: str, index: str, output: str) -> onnx.NodeProto:
    """NNInterpolate as a standard op: [N, C, K] gathered by index [Ho, Wo] gives [N, C, Ho, Wo]."""
    return helper.make_node("Gather", [compact, index], [output], axis=2)


def _referenced(name: str, attribute_type: int, ref: str | None = None) -> onnx.AttributeProto:
    """An attribute of a function body node that takes the calling node's attribute ``ref`` (default:
    the same name)."""
    attribute = onnx.AttributeProto()
    attribute.name, attribute.ref_attr_name = name, ref or name
    attribute.type = attribute_type
    return attribute


def _function(name, overload, inputs, outputs, nodes, attributes, opset) -> onnx.FunctionProto:
    function = helper.make_function(DOMAIN, name, inputs, outputs, nodes,
                                    opset_imports=[helper.make_opsetid("", opset)], attributes=list(attributes))
    function.overload = overload
    return function


def _variant(node: onnx.NodeProto, optional_input: int, attribute: str, names: tuple, default: str) -> tuple[bool, str]:
    """(whether the node gives its optional input ``optional_input``, the value of its string
    ``attribute``, checked against ``names``)."""
    given = len(node.input) > optional_input and bool(node.input[optional_input])
    value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == attribute), default)
    value = value.decode() if isinstance(value, bytes) else value
    if value not in names:
        raise ValueError(f"{node.op_type} node {node.name!r}: {attribute} {value!r}, expected one of {names}")
    return given, value


def perforated_conv_variant(node: onnx.NodeProto) -> tuple[bool, str]:
    """(reads a compact input through X_index, activation) of a PerforatedConv node."""
    return _variant(node, 4, "activation", ACTIVATIONS, "")


def _perforated_conv_body(activation: str | None) -> tuple[list, list]:
    """Nodes and referenced attributes of PerforatedConv without X_index, in standard ONNX: the full
    Conv, the computed positions (NonZero of the mask) gathered, then the activation.

    With ``activation`` given, the body is for nodes with that activation only (plain numeric ops: the
    expanded form). With None, it serves every node (the model-local function): the string attribute
    is compared to each name by counting the distinct values of the pair (``Unique``; the string
    ``Equal`` needs opset 19), each activation is computed and ``Where`` picks the named one. A body
    cannot test whether an optional input is present, so nodes with X_index have no body: the
    portable form reads their input through an NNInterpolate first."""
    conv = helper.make_node("Conv", ["X", "W", "B"], ["full"])
    conv.attribute.extend(_referenced(name, _ATTRIBUTE_TYPES[kind])
                          for name, kind in (("strides", "ints"), ("pads", "ints"), ("dilations", "ints"), ("group", "int")))
    attributes = ["strides", "pads", "dilations", "group"]
    nodes = [
        conv,
        helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Reshape", ["mask", "minus_one"], ["mask_flat"]),
        helper.make_node("NonZero", ["mask_flat"], ["nonzero"]),
        helper.make_node("Reshape", ["nonzero", "minus_one"], ["positions"]),
    ]
    wanted = ACTIVATIONS[1:] if activation is None else [a for a in (activation,) if a]
    nodes += gather_positions("full", "positions", "picked" if wanted else "Yc", lambda stem: stem)
    for name in wanted:
        output = "Yc" if activation else name
        if name == "Relu":
            nodes.append(helper.make_node("Relu", ["picked"], [output]))
        elif name == "LeakyRelu":  # PRelu with the slope as a tensor: onnx.reference (1.23) cannot
            # run a unary op whose attribute refers to the function's
            slope = helper.make_node("Constant", [], ["alpha"])
            slope.attribute.append(_referenced("value_float", OpSchema.AttrType.FLOAT, "alpha"))
            nodes += [slope, helper.make_node("PRelu", ["picked", "alpha"], [output])]
            attributes.append("alpha")
        else:
            for bound in ("clip_min", "clip_max"):
                constant = helper.make_node("Constant", [], [bound])
                constant.attribute.append(_referenced("value_float", OpSchema.AttrType.FLOAT, bound))
                nodes.append(constant)
            nodes.append(helper.make_node("Clip", ["picked", "clip_min", "clip_max"], [output]))
            attributes += ["clip_min", "clip_max"]
    if activation is None:
        attributes.append("activation")
        nodes += _select_by_name("activation", {name: name for name in wanted}, "picked", "Yc")
    return nodes, attributes


def _select_by_name(attribute: str, candidates: dict, otherwise: str, output: str) -> list[onnx.NodeProto]:
    """Nodes setting ``output`` to ``candidates[name]`` (a tensor) for the name the string attribute
    ``attribute`` of the calling node holds, else to ``otherwise``. A name is compared by counting the
    distinct values of the pair (``Unique``): the string ``Equal`` needs opset 19."""
    name = helper.make_node("Constant", [], [f"{attribute}_scalar"])
    name.attribute.append(_referenced("value_string", OpSchema.AttrType.STRING, attribute))
    nodes = [
        name,
        helper.make_node("Constant", [], [f"{attribute}_shape"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Reshape", [f"{attribute}_scalar", f"{attribute}_shape"], [attribute]),
        helper.make_node("Constant", [], [f"{attribute}_one"], value=numpy_helper.from_array(np.array(1, np.int64))),
    ]
    selected = otherwise
    for candidate, tensor in candidates.items():
        stem = f"{attribute}_{candidate}"
        nodes += [
            helper.make_node("Constant", [], [f"{stem}_name"],
                             value=helper.make_tensor(f"{stem}_name", TensorProto.STRING, [1], [candidate.encode()])),
            helper.make_node("Concat", [attribute, f"{stem}_name"], [f"{stem}_pair"], axis=0),
            helper.make_node("Unique", [f"{stem}_pair"], [f"{stem}_distinct"]),
            helper.make_node("Size", [f"{stem}_distinct"], [f"{stem}_count"]),
            helper.make_node("Equal", [f"{stem}_count", f"{attribute}_one"], [f"{stem}_named"]),
            helper.make_node("Where", [f"{stem}_named", tensor, selected], [f"{stem}_or_before"]),
        ]
        selected = f"{stem}_or_before"
    return nodes + [helper.make_node("Identity", [selected], [output])]


def _perforated_conv_function(node: onnx.NodeProto | None, opset: int) -> onnx.FunctionProto:
    """The body for every node (``node`` None: the model-local function), or for ``node``'s
    activation (an overload named after it: the expanded form inlines one per node)."""
    if node is not None and perforated_conv_variant(node)[0]:
        raise ValueError(f"PerforatedConv node {node.name!r} reads a compact input (X_index): it has no "
                         "standard-ONNX body; interpolate its input first")
    activation = perforated_conv_variant(node)[1] if node is not None else None
    nodes, attributes = _perforated_conv_body(activation)
    overload = "" if node is None else (activation.lower() or "plain")
    return _function("PerforatedConv", overload, ["X", "W", "B", "mask"], ["Yc"], nodes, attributes, opset)


def _pool(op_type: str, source: str, output: str) -> tuple[onnx.NodeProto, list]:
    """MaxPool / AveragePool with the calling node's attributes (AveragePool has no dilations)."""
    names = ["kernel_shape", "strides", "pads", "ceil_mode"] + (["dilations"] if op_type == "MaxPool" else
                                                                ["count_include_pad"])
    node = helper.make_node(op_type, [source], [output])
    node.attribute.extend(_referenced(n, _ATTRIBUTE_TYPES["ints" if n in ("kernel_shape", "strides", "pads",
                                                                           "dilations") else "int"]) for n in names)
    return node, names


def compact_pool_variant(node: onnx.NodeProto) -> tuple[bool, str]:
    """(computes only Y_positions, mode) of a CompactPool node."""
    return _variant(node, 2, "mode", COMPACT_POOL_MODES, "")


def _compact_pool_function(node: onnx.NodeProto | None, opset: int) -> onnx.FunctionProto:
    """The input interpolated (a Gather), then MaxPool or AveragePool as ``mode`` says. Like X_index,
    Y_positions cannot be tested for in a body: the portable form gathers those positions after a
    full-output CompactPool instead."""
    positions, mode = compact_pool_variant(node) if node is not None else (False, None)
    if positions:
        raise ValueError(f"CompactPool node {node.name!r} computes only Y_positions: it has no standard-ONNX "
                         "body; gather the positions from its full output")
    nodes = [nearest_fill("X", "X_index", "X_full")]
    attributes = set()
    for candidate, op_type in (("max", "MaxPool"), ("average", "AveragePool")):
        if mode in (None, candidate):
            pool, names = _pool(op_type, "X_full", "Y" if mode else op_type)
            nodes.append(pool)
            attributes.update(names)
    if mode is None:
        attributes.add("mode")
        nodes += _select_by_name("mode", {"max": "MaxPool"}, "AveragePool", "Y")
    return _function("CompactPool", "" if node is None else mode, ["X", "X_index"], ["Y"], nodes,
                     sorted(attributes), opset)


def _nn_interpolate_function(node: onnx.NodeProto | None, opset: int) -> onnx.FunctionProto:
    return _function("NNInterpolate", "", ["Yc", "index"], ["Y"], [nearest_fill("Yc", "index", "Y")], [], opset)


# ----------------------------------------------------------------------------------------------------
# The operators

_FLOAT = ("T", ("tensor(float)",), "float32 (the kernels' only type)")
_CONV_ATTRIBUTES = (
    Attribute("kernel_shape", "ints", None, "[kH, kW]; from W when absent"),
    Attribute("strides", "ints", [1, 1], "[sH, sW]"),
    Attribute("pads", "ints", [0, 0, 0, 0], "[top, left, bottom, right]"),
    Attribute("dilations", "ints", [1, 1], "[dH, dW]"),
    Attribute("group", "int", 1, "number of groups"),
)


def _no_portable_form(node: onnx.NodeProto | None, opset: int) -> onnx.FunctionProto:
    raise ValueError("PerforatedQLinearConv has no standard-ONNX body yet (no portable form of quantized models)")


OPERATORS: tuple[OperatorDefinition, ...] = (
    OperatorDefinition(
        name="PerforatedConv",
        since_version=1,
        doc="A 2-D convolution computed only at the nonzero positions of `mask`, returning them compact "
        "[N, M, K] in row-major order (bias and activation applied). See docs/ops.md.",
        inputs=(
            Parameter("X", "T", "input [N, C, H, W]; compact [N, C, K_in] when X_index is given"),
            Parameter("W", "T", "weights [M, C/group, kH, kW]"),
            Parameter("B", "T", "bias [M]", optional=True),
            Parameter("mask", "T_MASK", "[Ho, Wo], nonzero = computed; a constant initializer"),
            Parameter("X_index", "tensor(int64)", "[H, W]: input pixel (y, x) is X[n, c, X_index[y, x]]",
                      optional=True),
        ),
        outputs=(Parameter("Yc", "T", "[N, M, K], K = number of nonzero mask entries"),),
        type_constraints=(_FLOAT, ("T_MASK", ("tensor(bool)", "tensor(uint8)"), "mask type")),
        attributes=_CONV_ATTRIBUTES + (
            Attribute("activation", "string", "", '"", "Relu", "LeakyRelu" or "Clip", after the bias'),
            Attribute("alpha", "float", 0.01, "LeakyRelu slope"),
            Attribute("clip_min", "float", -FLOAT32_MAX, "Clip lower bound"),
            Attribute("clip_max", "float", FLOAT32_MAX, "Clip upper bound"),
        ),
        infer=_infer_perforated_conv,
        function=_perforated_conv_function,
    ),
    OperatorDefinition(
        name="PerforatedQLinearConv",
        since_version=1,
        doc="ONNX QLinearConv computed only at the nonzero positions of `mask` (uint8 or int8 activations x int8 "
        "weights), returning them compact [N, M, K], requantized as ORT's QLinearConv. See docs/ops.md.",
        inputs=(
            Parameter("x", "T1", "input [N, C, H, W]; compact [N, C, K_in] when X_index is given; without "
                      "X_index, [N, C, K] is read as one row [N, C, 1, K]"),
            Parameter("x_scale", "tensor(float)", "scalar"),
            Parameter("x_zero_point", "T1", "scalar"),
            Parameter("w", "T2", "int8 weights [M, C/group, kH, kW]"),
            Parameter("w_scale", "tensor(float)", "scalar or [M]"),
            Parameter("w_zero_point", "T2", "scalar or [M]; nonzero: asymmetric weights"),
            Parameter("y_scale", "tensor(float)", "scalar"),
            Parameter("y_zero_point", "T1", "scalar"),
            Parameter("B", "tensor(int32)", "bias [M], scale x_scale * w_scale", optional=True),
            Parameter("mask", "T_MASK", "[Ho, Wo], nonzero = computed; a constant initializer"),
            Parameter("X_index", "tensor(int64)", "[H, W]: input pixel (y, x) is x[n, c, X_index[y, x]]",
                      optional=True),
        ),
        outputs=(Parameter("Yc", "T1", "[N, M, K], K = number of nonzero mask entries"),),
        type_constraints=(("T1", ("tensor(uint8)", "tensor(int8)"), "activations"), ("T2", ("tensor(int8)",), "weights"),
                          ("T_MASK", ("tensor(bool)", "tensor(uint8)"), "mask type")),
        attributes=_CONV_ATTRIBUTES + (
            Attribute("activation", "string", "", '"", "Relu" or "Clip": a clamp of the quantized output'),
            Attribute("clip_min", "float", -FLOAT32_MAX, "Clip lower bound (real units)"),
            Attribute("clip_max", "float", FLOAT32_MAX, "Clip upper bound (real units)"),
        ),
        infer=_infer_perforated_qlinear_conv,
        function=_no_portable_form,
    ),
    OperatorDefinition(
        name="NNInterpolate",
        since_version=1,
        doc="Nearest-neighbour fill of a perforated output: Y[n, m, i, j] = Yc[n, m, index[i, j]].",
        inputs=(
            Parameter("Yc", "T", "[N, M, K], compact output of PerforatedConv or PerforatedQLinearConv"),
            Parameter("index", "tensor(int64)", "[Ho, Wo], values in [0, K); a constant initializer"),
        ),
        outputs=(Parameter("Y", "T", "[N, M, Ho, Wo]"),),
        type_constraints=(("T", ("tensor(float)", "tensor(uint8)", "tensor(int8)"),
                           "float32, or uint8 / int8 after PerforatedQLinearConv"),),
        attributes=(),
        infer=_infer_nn_interpolate,
        function=_nn_interpolate_function,
    ),
    OperatorDefinition(
        name="CompactPool",
        since_version=1,
        doc="MaxPool / AveragePool of a compact tensor read through its interpolation index: "
        "Y = Pool(NNInterpolate(X, X_index)), at Y_positions only when given. See docs/ops.md.",
        inputs=(
            Parameter("X", "T", "compact input [N, C, K_in]"),
            Parameter("X_index", "tensor(int64)", "[H, W]: input pixel (y, x) is X[n, c, X_index[y, x]]"),
            Parameter("Y_positions", "tensor(int64)", "[K_out] row-major output positions to compute",
                      optional=True),
        ),
        outputs=(Parameter("Y", "T", "[N, C, Ho, Wo], or [N, C, K_out] with Y_positions"),),
        type_constraints=(("T", ("tensor(float)", "tensor(uint8)", "tensor(int8)"),
                           'float32, or uint8 / int8 after PerforatedQLinearConv ("max" only)'),),
        attributes=(
            Attribute("mode", "string", None, '"max" (MaxPool) or "average" (AveragePool, float32 only)',
                      required=True),
            Attribute("kernel_shape", "ints", None, "[kH, kW]", required=True),
            Attribute("strides", "ints", [1, 1], "[sH, sW]"),
            Attribute("pads", "ints", [0, 0, 0, 0], "[top, left, bottom, right], each smaller than the window"),
            Attribute("dilations", "ints", [1, 1], '[dH, dW], "max" only'),
            Attribute("ceil_mode", "int", 0, "as ONNX pooling"),
            Attribute("count_include_pad", "int", 0, '"average": padding counts in the divisor'),
        ),
        infer=_infer_compact_pool,
        function=_compact_pool_function,
    ),
)

assert all(op.since_version <= OPSET_VERSION for op in OPERATORS)


def definition(op_type: str, version: int = OPSET_VERSION) -> OperatorDefinition | None:
    """The newest definition of ``op_type`` at or below ``version``, or None."""
    found = [op for op in OPERATORS if op.name == op_type and op.since_version <= version]
    return max(found, key=lambda op: op.since_version) if found else None


def register_schemas() -> None:
    """Register every op's schema with onnx (idempotent)."""
    for op in OPERATORS:
        if not onnx.defs.has(op.name, op.since_version, DOMAIN):
            onnx.defs.register_schema(op.schema())
