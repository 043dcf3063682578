"""Pass: fuse the Relu / LeakyRelu / Clip that follows a Conv into PerforatedConv's ``activation``."""

from __future__ import annotations

from .. import ops
from .op_table import FUSABLE_ACTIVATIONS
from .surgery import Refusal, Surgeon, constant_value, describe


def clip_bounds(surgeon: Surgeon, clip) -> tuple[float, float] | None:
    """Clip's (min, max) as floats (attributes before opset 11, constant inputs after), or None
    when a bound is not a constant scalar."""
    if surgeon.opset < 11:
        return float(clip.attrs.get("min", -ops.FLOAT32_MAX)), float(clip.attrs.get("max", ops.FLOAT32_MAX))
    bounds = []
    for i, default in ((1, -ops.FLOAT32_MAX), (2, ops.FLOAT32_MAX)):
        if len(clip.inputs) <= i or not clip.inputs[i].name:
            bounds.append(default)
            continue
        value = constant_value(clip.inputs[i])
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(())))
    return bounds[0], bounds[1]


def fuse_activation(surgeon: Surgeon, attrs: ops.ConvAttributes, output):
    """Fuse the activation that alone reads ``output`` into ``attrs`` (updated in place) and remove it.
    Returns the activation's output tensor (now the Conv's), or a :class:`Refusal`."""
    act = surgeon.sole_consumer(output)
    if isinstance(act, Refusal):
        return act
    if act.op not in FUSABLE_ACTIVATIONS or act.domain not in ("", "ai.onnx", None):
        return Refusal(f"next op is {describe(act)}, not {'/'.join(FUSABLE_ACTIVATIONS)}", act.name)
    if act.op == "Clip":
        bounds = clip_bounds(surgeon, act)
        if bounds is None:
            return Refusal(f"Clip {act.name!r} has non-constant bounds", act.name)
        attrs.clip_min, attrs.clip_max = bounds
    if act.op == "LeakyRelu":
        attrs.alpha = float(act.attrs.get("alpha", 0.01))
    attrs.activation = act.op
    result = act.outputs[0]
    surgeon.detach(act)
    return result


__all__ = ["clip_bounds", "fuse_activation"]
