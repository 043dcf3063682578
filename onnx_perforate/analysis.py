"""One analysed model: loaded and checked once, with its shapes, Conv geometry, consumers and the
op table's view of its nodes. ``inspect``, ``rewrite``, ``impact`` and ``tune`` accept it wherever they
take a model (a ModelProto or a path still works), so one ``tune`` call loads, checks and infers the
model once instead of for every candidate it rewrites."""

from __future__ import annotations

from functools import cached_property

import onnx

from .errors import PerforateError
from .graph import (
    ConvGeometry,
    check_model,
    conv_geometry,
    consumers,
    default_opset,
    infer_shapes,
    load_model,
    node_key,
)
from .passes.op_table import Semantics, semantics


class AnalysedModel:
    """``model`` (a private, checked copy: do not modify it) and what the package asks of it."""

    def __init__(self, model):
        self.model: onnx.ModelProto = load_model(model)
        check_model(self.model)
        self.opset: int = default_opset(self.model)
        self.shapes: dict = infer_shapes(self.model)

    @cached_property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """{tensor name: the nodes reading it}."""
        return consumers(self.model)

    @cached_property
    def nodes(self) -> dict[str, onnx.NodeProto]:
        """{node key (name, or first output for unnamed nodes): node}."""
        return {node_key(n): n for n in self.model.graph.node}

    @cached_property
    def conv_geometry(self) -> dict[str, ConvGeometry | PerforateError]:
        """{Conv key: its geometry, or the error that says why it has none} for every ONNX Conv."""
        result = {}
        for node in self.model.graph.node:
            if node.op_type in ("Conv", "QLinearConv"):
                try:
                    result[node_key(node)] = conv_geometry(node, self.shapes)
                except PerforateError as exc:
                    result[node_key(node)] = exc
        return result

    @cached_property
    def op_kinds(self) -> dict[str, Semantics | None]:
        """The op table's view: {node key: its op's Semantics, None for ops the table does not know}."""
        return {key: semantics(n.op_type, n.domain) for key, n in self.nodes.items()}


def analyse(model) -> AnalysedModel:
    """``model`` analysed (an :class:`AnalysedModel` is returned as it is)."""
    return model if isinstance(model, AnalysedModel) else AnalysedModel(model)


__all__ = ["AnalysedModel", "analyse"]
