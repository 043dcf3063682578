"""What the graph passes, the tuner and the masks need to know about standard ONNX ops: one table.

Each op type maps to one :class:`Semantics`. The questions the rest of the package asks
(``is_position_wise``, ``keeps_grid``, ``FUSABLE_ACTIVATIONS``...) are answered from this table
only, so adding an op is one edit here.
"""

from __future__ import annotations

import enum

from onnx import helper

from ..ops import ACTIVATIONS


class Semantics(enum.Enum):
    """How an op's output positions relate to its input positions (for tensors [N, C, H, W])."""

    UNARY = "element-wise, one tensor input (input 0; any other input is a scalar bound)"
    ELEMENTWISE = "element-wise over broadcast operands (several tensors, or per-channel constants)"
    NORMALIZATION = "per-channel affine at inference (BatchNormalization)"
    IDENTITY = "the identity at inference"
    CHANNEL_CONCAT = "concatenation (position-wise when along channels)"
    SPATIAL_REDUCTION = "reduction over the spatial axes (global pooling)"


_TABLE: dict[str, Semantics] = {
    **{op: Semantics.UNARY for op in (
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus",
        "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "ThresholdedRelu",
        "Celu", "Floor", "Ceil", "Round", "Sign",
    )},
    **{op: Semantics.ELEMENTWISE for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow")},
    "BatchNormalization": Semantics.NORMALIZATION,
    "Dropout": Semantics.IDENTITY,
    "Identity": Semantics.IDENTITY,
    "Concat": Semantics.CHANNEL_CONCAT,
    **{op: Semantics.SPATIAL_REDUCTION for op in (
        "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax")},
}

# PerforatedConv's ``activation`` attribute: the activations a Conv can absorb.
FUSABLE_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a)


# Ops ORT's NCHWc transformer keeps in its blocked layout when all their tensor inputs are blocked
# (the activations also fuse into the Conv before them); read by passes.profitability.nchwc_reorders.
NCHWC_FOLLOWERS = frozenset({
    "Concat", "Add", "Sum", "Mul", "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish",
    "BatchNormalization", "Dropout", "Identity", "GlobalMaxPool", "GlobalAveragePool",
})


def semantics(op_type: str, domain: str | None = "") -> Semantics | None:
    """The op's row of the table; None for ops it does not know (they need the full tensor)."""
    if domain not in ("", "ai.onnx", None):
        return None
    return _TABLE.get(op_type)


def ops_with(kind: Semantics) -> tuple[str, ...]:
    """Every op type of one kind, sorted (for documentation and dispatch tables)."""
    return tuple(sorted(op for op, k in _TABLE.items() if k is kind))


def is_position_wise(op_type: str, domain: str | None = "") -> bool:
    """True when output position (y, x) depends only on input position (y, x) of every operand
    (operands broadcast per channel): such an op commutes with nearest-neighbour interpolation."""
    return semantics(op_type, domain) in (Semantics.UNARY, Semantics.ELEMENTWISE, Semantics.NORMALIZATION,
                                          Semantics.IDENTITY)


def is_channel_axis(axis: int) -> bool:
    return int(axis) in (1, -3)


def keeps_grid(node) -> bool:
    """True when ``node`` (a NodeProto) passes its input's spatial grid through position for position:
    position-wise ops and channel Concat. Followed by the pooling-structure masks and by the tuner's
    compact regions."""
    kind = semantics(node.op_type, node.domain)
    if kind is Semantics.CHANNEL_CONCAT:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        return is_channel_axis(axis)
    return is_position_wise(node.op_type, node.domain)


__all__ = ["FUSABLE_ACTIVATIONS", "NCHWC_FOLLOWERS", "Semantics", "is_channel_axis", "is_position_wise", "keeps_grid",
           "ops_with", "semantics"]
