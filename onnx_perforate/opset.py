"""The ``onnx_perforate`` operator set as data: one :class:`OperatorDefinition` per op and version.

Each definition carries what the ONNX ecosystem needs to understand a node without our library:
inputs, outputs and attributes with their defaults (an ONNX ``OpSchema``), type and shape inference,
and the standard-ONNX body of the op (a model-local function, see ``portable.py``). Adding an op is
one entry in :data:`OPERATORS`. docs/ops.md is the prose specification of the same ops.

:func:`register_schemas` registers the schemas with onnx (done on import of the package), after which
``onnx.shape_inference.infer_shapes`` and ``onnx.checker.check_model(full_check=True)`` check and
infer perforated models. Only onnx and numpy are imported here: registering is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from ._library import DOMAIN, OPSET_VERSION

FLOAT32_MAX = float(np.finfo(np.float32).max)
ACTIVATIONS = ("", "Relu", "LeakyRelu", "Clip")

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
    """An attribute; ``default`` None means optional with no default (derived from the inputs)."""

    name: str
    type: str  # "int" | "ints" | "float" | "string"
    default: object
    doc: str


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
                attributes.append(OpSchema.Attribute(a.name, _ATTRIBUTE_TYPES[a.type], a.doc, required=False))
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
    compact = node.present(4)
    x = node.shape(0, 3 if compact else 4)
    w = node.shape(1, 4)
    group = int(node.attribute("group"))
    if group < 1:
        node.fail(f"group must be positive, got {group}")
    channels, outputs = (x[1] if x else None), (w[0] if w else None)
    if w and _known(channels, w[1]) and channels != w[1] * group:
        node.fail(f"X has {channels} channels but W {w} with group {group} expects {w[1] * group}")
    if _known(outputs) and outputs % group:
        node.fail(f"group {group} does not divide W's {outputs} output channels")
    if node.present(2):
        b = node.shape(2, 1)
        if b and _known(b[0], outputs) and b[0] != outputs:
            node.fail(f"B has shape {b}, expected [{outputs}] (W's output channels)")
    kernel = node.attribute("kernel_shape")
    if kernel is not None and w and _known(*w[2:]) and list(kernel) != w[2:]:
        node.fail(f"kernel_shape {list(kernel)} does not match W's spatial shape {w[2:]}")
    kernel = list(kernel) if kernel is not None else (w[2:] if w else None)
    activation = node.attribute("activation")
    if activation not in ACTIVATIONS:
        node.fail(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")

    mask_shape = node.shape(3, 2)
    if compact:
        index_shape = node.shape(4, 2)
        if node.elem_type(4) not in (0, TensorProto.INT64):
            node.fail("X_index must be int64")
        spatial = index_shape
    else:
        spatial = x[2:] if x else None
    if mask_shape and spatial and kernel and _known(*mask_shape, *spatial, *kernel):
        from .ops import conv_output_size

        expected = list(conv_output_size(spatial, kernel, node.attribute("strides"), node.attribute("pads"),
                                         node.attribute("dilations")))
        if mask_shape != expected:
            node.fail(f"mask has shape {mask_shape}, expected the convolution's output size {expected}")
    mask = node.constant(3)
    computed = None
    if mask is not None:
        computed = int(np.count_nonzero(mask))
        if computed == 0:
            node.fail("mask has no nonzero entry (K = 0)")
    node.set_output(0, node.elem_type(0), [x[0] if x else None, outputs, computed])


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


def perforated_conv_variant(node: onnx.NodeProto) -> tuple[bool, str]:
    """(reads a compact input through X_index, activation) of a PerforatedConv node."""
    compact = len(node.input) > 4 and bool(node.input[4])
    activation = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "activation"), b"")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"PerforatedConv node {node.name!r}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return compact, activation


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
        name = helper.make_node("Constant", [], ["activation_scalar"])
        name.attribute.append(_referenced("value_string", OpSchema.AttrType.STRING, "activation"))
        nodes += [name, helper.make_node("Reshape", ["activation_scalar", "minus_one"], ["activation"]),
                  helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64)))]
        selected = "picked"
        for candidate in wanted:
            pair, distinct, count, is_it, picked = (f"{candidate}_{part}" for part in
                                                    ("pair", "distinct", "count", "named", "or_before"))
            nodes += [
                helper.make_node("Constant", [], [f"{candidate}_name"],
                                 value=helper.make_tensor(f"{candidate}_name", TensorProto.STRING, [1], [candidate.encode()])),
                helper.make_node("Concat", ["activation", f"{candidate}_name"], [pair], axis=0),
                helper.make_node("Unique", [pair], [distinct]),
                helper.make_node("Size", [distinct], [count]),
                helper.make_node("Equal", [count, "one"], [is_it]),
                helper.make_node("Where", [is_it, candidate, selected], [picked]),
            ]
            selected = picked
        nodes.append(helper.make_node("Identity", [selected], ["Yc"]))
    return nodes, attributes


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


def _nn_interpolate_function(node: onnx.NodeProto | None, opset: int) -> onnx.FunctionProto:
    return _function("NNInterpolate", "", ["Yc", "index"], ["Y"], [nearest_fill("Yc", "index", "Y")], [], opset)


# ----------------------------------------------------------------------------------------------------
# The operators

_FLOAT = ("T", ("tensor(float)",), "float32 (the kernels' only type)")

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
        attributes=(
            Attribute("kernel_shape", "ints", None, "[kH, kW]; from W when absent"),
            Attribute("strides", "ints", [1, 1], "[sH, sW]"),
            Attribute("pads", "ints", [0, 0, 0, 0], "[top, left, bottom, right]"),
            Attribute("dilations", "ints", [1, 1], "[dH, dW]"),
            Attribute("group", "int", 1, "number of groups"),
            Attribute("activation", "string", "", '"", "Relu", "LeakyRelu" or "Clip", after the bias'),
            Attribute("alpha", "float", 0.01, "LeakyRelu slope"),
            Attribute("clip_min", "float", -FLOAT32_MAX, "Clip lower bound"),
            Attribute("clip_max", "float", FLOAT32_MAX, "Clip upper bound"),
        ),
        infer=_infer_perforated_conv,
        function=_perforated_conv_function,
    ),
    OperatorDefinition(
        name="NNInterpolate",
        since_version=1,
        doc="Nearest-neighbour fill of a perforated output: Y[n, m, i, j] = Yc[n, m, index[i, j]].",
        inputs=(
            Parameter("Yc", "T", "[N, M, K], compact output of PerforatedConv"),
            Parameter("index", "tensor(int64)", "[Ho, Wo], values in [0, K); a constant initializer"),
        ),
        outputs=(Parameter("Y", "T", "[N, M, Ho, Wo]"),),
        type_constraints=(_FLOAT,),
        attributes=(),
        infer=_infer_nn_interpolate,
        function=_nn_interpolate_function,
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
