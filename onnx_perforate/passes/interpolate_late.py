"""Pass: run the position-wise ops that follow a perforated Conv on its compact output [N, C, K], and
interpolate after them (one op at a time, while each is the sole consumer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .position_wise import operand_replacements
from .surgery import Refusal, Surgeon, describe, node_name


@dataclass
class LateInterpolation:
    compact: gs.Variable  # the last compact tensor, which NNInterpolate now reads
    output: gs.Variable  # the full tensor NNInterpolate now writes
    moved: list = field(default_factory=list)  # names of the ops now run on compact tensors
    stopped: Refusal | None = None  # why the next op was not moved


def interpolate_late(surgeon: Surgeon, compact, output, compact_shape) -> LateInterpolation:
    """Move the ops after ``output`` (the full tensor) onto ``compact`` [N, C, K] while they commute."""
    channels = compact_shape[1]
    moved = []
    while True:
        op = surgeon.sole_consumer(output)
        if isinstance(op, Refusal):
            return LateInterpolation(compact, output, moved, Refusal(f"stopped: {op.reason}"))
        replacements = operand_replacements(surgeon, op, lambda tensor: tensor is output, channels)
        if isinstance(replacements, Refusal):
            return LateInterpolation(compact, output, moved,
                                     Refusal(f"stopped at {describe(op)}: {replacements.reason}", op.name))
        result = op.outputs[0]
        step = gs.Variable(surgeon.unique(f"{result.name}.compact"), dtype=np.float32, shape=list(compact_shape))
        for i, tensor in enumerate(list(op.inputs)):
            op.inputs[i] = compact if tensor is output else replacements.get(i, tensor)
        op.outputs[0] = step
        moved.append(node_name(op))
        compact, output = step, result


__all__ = ["LateInterpolation", "interpolate_late"]
