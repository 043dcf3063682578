"""The portable form of a perforated model (docs/deployment.md).

Every custom op of the model gets its standard-ONNX body as a model-local function (from
``opset.OPERATORS``). ONNX Runtime with our library registered runs the custom kernels: a node that
an execution provider has a kernel for is not inlined. Any other runtime (onnxruntime without the
library, onnx.reference, converters that read model-local functions) runs the bodies, which compute
the full convolution and gather the computed positions: the same outputs, without the speed-up.

One body serves every node of an op: runtimes such as onnx.reference and ONNX Runtime 1.21 ignore
function overloads. A body cannot test whether an optional input is given, so a PerforatedConv that
reads a compact input through X_index reads it through an NNInterpolate instead, and a CompactPool
computing only Y_positions computes its full output, which a Gather then reads (the same values; the
fast kernels pay one more pass, docs/deployment.md gives the cost).

``expand=True`` instead replaces each custom node by plain numeric standard ops specialised to it
(no string handling left), for runtimes that do not read model-local functions; no custom op is left,
so our kernels are not used either.
"""

from __future__ import annotations

import onnx
from onnx import helper, version_converter

from ._library import DOMAIN
from .errors import PerforateError
from .graph import default_opset, load_model, model_size, unique_name
from .opset import definition, gather_positions
from . import ops

MIN_OPSET = 13  # the bodies need Constant(value_string / value_float) (opset 12); older models go to 13
FUNCTIONS_IR_VERSION = 8  # model-local functions
OVERLOAD_IR_VERSION = 10  # the expanded form inlines one function overload per node variant
FORMS = ("functions", "expanded")


def upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """``model`` converted to opset :data:`MIN_OPSET` when older (a note saying so), else unchanged.

    Done on the original model, before perforation: the converter does not know the custom ops."""
    opset = default_opset(model)
    if opset >= MIN_OPSET:
        return model, None
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter's own errors are terse
        raise PerforateError(
            f"the portable form needs opset >= {MIN_OPSET} and converting the model from opset {opset} failed: {exc}"
        ) from exc
    # The IR version stays: the rewriter raises IR 3 to 4 and drops the weights listed as graph inputs
    # (which IR >= 4 would make overridable, i.e. not constant).
    return converted, f"default opset converted from {opset} to {MIN_OPSET} for the portable form's function bodies"


def form(portable) -> str | None:
    """The portable form a ``portable`` argument asks for: None, "functions" or "expanded"."""
    if portable in (False, None):
        return None
    if portable is True:
        return "functions"
    if portable in FORMS:
        return portable
    raise PerforateError(f"portable must be False, True or one of {FORMS}, got {portable!r}")


def make_portable(model, *, expand: bool = False) -> onnx.ModelProto:
    """A copy of a perforated model with a standard-ONNX function body for each custom op (and, with
    ``expand``, those bodies inlined into the graph). Models already portable are refreshed."""
    model = load_model(model)
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise PerforateError(
            f"the portable form needs the model's default opset >= {MIN_OPSET}, got {opset}; perforate the "
            "original with rewrite(..., portable=True), which converts it first"
        )
    version = next((o.version for o in model.opset_import if o.domain == DOMAIN), None)
    if version is None:
        raise PerforateError(f"the model imports no {DOMAIN!r} domain: it is not perforated")
    _without_optional_inputs(model)
    functions = {}
    for node in _all_nodes(model.graph):
        if node.domain != DOMAIN:
            continue
        op = definition(node.op_type, version)
        name = node.name or node.output[0]
        if op is None:
            raise PerforateError(f"node {name!r}: {DOMAIN}.{node.op_type} has no definition at version {version}")
        try:
            # expanded: a body for this node's attributes, inlined below; else one body for every node,
            # except CompactPool's, one per mode: a body holding both poolings would not type-check for
            # an 8-bit X (ONNX's AveragePool takes floats only)
            per_node = expand or node.op_type == "CompactPool"
            function = op.function(node if per_node else None, opset)
        except ValueError as exc:
            raise PerforateError(str(exc)) from exc
        # onnx.reference passes a function only the attributes a node has: write the defaults it reads
        present = {a.name for a in node.attribute}
        node.attribute.extend(helper.make_attribute(a, op.default(a)) for a in function.attribute if a not in present)
        node.overload = function.overload
        functions.setdefault((function.name, function.overload), function)
    kept = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(kept + list(functions.values()))
    ir_version = model.ir_version
    model.ir_version = max(ir_version, FUNCTIONS_IR_VERSION)
    if expand:
        from onnx import inliner

        model.ir_version = max(ir_version, OVERLOAD_IR_VERSION)
        model = inliner.inline_local_functions(model)
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)
        model.ir_version = max(ir_version, helper.find_min_ir_version_for(imports, True))
    if model_size(model) < 2**31 - (64 << 20):
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            raise PerforateError(f"internal error: the portable model does not validate: {exc}") from exc
    return model


def _without_optional_inputs(model: onnx.ModelProto) -> None:
    """Rewrite, in place, the nodes whose optional inputs no body can serve, keeping their values:
    a PerforatedConv reading a compact input through X_index reads it through an NNInterpolate (one per
    compact tensor and index); a CompactPool computing only Y_positions computes its full output, and
    a Gather picks the positions."""
    graph = model.graph
    taken = {name for node in graph.node for name in list(node.output) + [node.name]}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}

    def fresh(stem: str) -> str:
        return unique_name(stem, taken)

    interpolated, nodes = {}, []
    for node in graph.node:
        optional = node.domain == DOMAIN and len(node.input) > {"PerforatedConv": 4, "CompactPool": 2}.get(
            node.op_type, len(node.input)) and node.input[-1]
        name = node.name or node.output[0]
        if optional and node.op_type == "PerforatedConv":
            key = (node.input[0], node.input[4])
            if key not in interpolated:
                interpolated[key] = fresh(f"{node.input[0]}.interpolated")
                nodes.append(ops.make_nn_interpolate_node(node.input[0], node.input[4], interpolated[key],
                                                          fresh(f"{name}/input_interpolate")))
            inputs = [interpolated[key]] + list(node.input[1:4])
            del node.input[:]
            node.input.extend(inputs)
        elif optional and node.op_type == "CompactPool":
            positions, output = node.input[2], node.output[0]
            full = fresh(f"{output}.full")
            del node.input[2:]
            node.output[0] = full
            nodes.append(node)
            nodes += gather_positions(full, positions, output, fresh)
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                yield from _all_nodes(sub)

