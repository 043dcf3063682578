"""Moving a position-wise op onto compact tensors [N, C, K]: shared by interpolate-late and compact."""

from __future__ import annotations

from typing import Callable

from .batchnorm import inference_batchnorm_refusal
from .op_table import Semantics, semantics
from .surgery import Refusal, Surgeon, constant_value, node_name, per_channel_refusal

MOVABLE = (Semantics.UNARY, Semantics.ELEMENTWISE, Semantics.NORMALIZATION)


def operand_replacements(surgeon: Surgeon, node, moves: Callable[[object], bool], channels) -> dict | Refusal:
    """For a position-wise ``node`` whose inputs for which ``moves(tensor)`` holds go compact: {input
    index: per-channel constant reshaped for [N, C, K]} for its other data operands, or why ``node``
    cannot run on compact tensors. Non-data inputs (Clip's bounds, BatchNormalization's parameters)
    stay as they are."""
    kind = semantics(node.op, node.domain)
    if kind not in MOVABLE:
        return Refusal("does not commute with nearest-neighbour interpolation", node.name)
    if kind is not Semantics.ELEMENTWISE and not moves(node.inputs[0]):
        return Refusal(f"{node.op}: the compact tensor is not its data input", node.name)
    if kind is Semantics.NORMALIZATION:
        # BatchNormalization is defined for [N, C, D1, ...]: rank 3 is as valid as rank 4.
        refusal = inference_batchnorm_refusal(surgeon, node)
        if refusal:
            return refusal
        return {}
    replacements = {}
    data_inputs = range(1) if kind is Semantics.UNARY else range(len(node.inputs))
    for i in data_inputs:
        tensor = node.inputs[i]
        if moves(tensor) or not tensor.name:
            continue
        value = constant_value(tensor)
        if value is None:
            return Refusal(f"operand {tensor.name!r} is a full (non-constant) tensor", node.name)
        refusal = per_channel_refusal(value, tensor.name, channels)
        if refusal:
            return Refusal(refusal.reason, node.name)
        replacements[i] = surgeon.per_channel_constant(f"{node_name(node)}.compact_param", value)
    return replacements


__all__ = ["MOVABLE", "operand_replacements"]
