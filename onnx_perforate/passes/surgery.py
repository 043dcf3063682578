"""The graph editor every pass works through (onnx-graphsurgeon underneath), constant lookup, and
:class:`Refusal`, what a pass returns when it does not apply."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import constant_node_value, unique_name


@dataclass(frozen=True)
class Refusal:
    """Why a pass did not apply, and the node it stopped at (None when no node is at fault)."""

    reason: str
    node: str | None = None

    def __str__(self) -> str:
        return self.reason


def node_name(node: gs.Node) -> str:
    """A node's name, or its first output's name for unnamed nodes."""
    return node.name or node.outputs[0].name


def describe(node: gs.Node) -> str:
    return f"{node.op} {node_name(node)!r}"


def constant_value(tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        attrs = [onnx.helper.make_attribute(k, v) for k, v in node.attrs.items() if k.startswith("value_")]
        return constant_node_value(attrs)
    return None


def per_channel_refusal(value: np.ndarray, name: str, channels) -> Refusal | None:
    """None when a constant float32 operand broadcasts per channel (or is a scalar) against [N, C, H, W]."""
    if value.dtype != np.float32:
        return Refusal(f"operand {name!r} is {value.dtype}, expected float32")
    padded = (1,) * (4 - value.ndim) + value.shape if value.ndim <= 4 else None
    if padded is None or padded[0] != 1 or padded[2:] != (1, 1) or padded[1] not in (1, channels):
        return Refusal(f"operand {name!r} of shape {list(value.shape)} is not per-channel")
    return None


def extra_outputs_used(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether anything reads ``node``'s outputs after the first (BatchNormalization's statistics,
    Dropout's mask)."""
    return any(t.outputs or t in graph.outputs for t in node.outputs[1:])


class Surgeon:
    """Edits one onnx-graphsurgeon graph: fresh names, constants, detaching nodes, consumers."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.names = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}

    def unique(self, base: str) -> str:
        return unique_name(base, self.names)

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique(base), np.ascontiguousarray(value))

    def per_channel_constant(self, base: str, value: np.ndarray) -> gs.Constant:
        """``value`` (checked by :func:`per_channel_refusal`) reshaped to broadcast against [N, C, K]."""
        return self.constant(base, value.reshape(value.size, 1))

    def detach(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)

    def sole_consumer(self, tensor) -> gs.Node | Refusal:
        """The only node reading ``tensor``, or why there is none."""
        if tensor in self.graph.outputs:
            return Refusal(f"{tensor.name!r} is a graph output")
        users = list(tensor.outputs)
        if len(users) != 1:
            return Refusal(f"{tensor.name!r} has {len(users)} consumers" if users else f"{tensor.name!r} is unused")
        return users[0]


__all__ = ["Refusal", "Surgeon", "constant_value", "describe", "extra_outputs_used", "node_name",
           "per_channel_refusal"]
