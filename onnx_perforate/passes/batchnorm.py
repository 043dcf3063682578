"""Pass: fold the inference BatchNormalization that follows a perforated Conv into its weight and bias."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .surgery import Refusal, Surgeon, constant_value, describe, extra_outputs_used


@dataclass
class FoldedBatchNorm:
    weight: gs.Tensor
    bias: gs.Tensor
    output: gs.Tensor  # the BatchNormalization's output, now the Conv's
    batchnorm: str  # the folded node's name


def inference_batchnorm_refusal(surgeon: Surgeon, bn: gs.Node) -> Refusal | None:
    """Why ``bn`` is not an inference-mode, single-output BatchNormalization (None if it is)."""
    def flag(name, default):
        return int(bn.attrs.get(name, default))

    if flag("training_mode", 0):
        return Refusal(f"BatchNormalization {bn.name!r} is in training mode", bn.name)
    if surgeon.opset < 7 and not flag("is_test", 0):
        return Refusal(f"BatchNormalization {bn.name!r} has is_test=0 (training)", bn.name)
    if 7 <= surgeon.opset < 9 and not flag("spatial", 1):
        return Refusal(f"BatchNormalization {bn.name!r} has spatial=0 (per-position statistics)", bn.name)
    if extra_outputs_used(surgeon.graph, bn):
        return Refusal(f"BatchNormalization {bn.name!r} uses its running statistics outputs", bn.name)
    return None


def fold_batchnorm(surgeon: Surgeon, name: str, weight, bias, output) -> FoldedBatchNorm | Refusal:
    """Fold the BatchNormalization that alone reads the Conv's ``output`` into ``weight`` and ``bias``
    (``bias`` may be None); the BatchNormalization is removed from the graph."""
    bn = surgeon.sole_consumer(output)
    if isinstance(bn, Refusal):
        return bn
    if bn.op != "BatchNormalization":
        return Refusal(f"next op is {describe(bn)}, not BatchNormalization", bn.name)
    refusal = inference_batchnorm_refusal(surgeon, bn)
    if refusal:
        return refusal
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        return Refusal(f"BatchNormalization {bn.name!r} has non-constant parameters", bn.name)
    w, b = constant_value(weight), (None if bias is None else constant_value(bias))
    if w is None or (bias is not None and b is None):
        return Refusal("the Conv's weight or bias is not constant", name)
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    new_w = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    base = np.zeros_like(mean) if b is None else b.astype(np.float64)
    new_b = ((base - mean) * scale + beta).astype(np.float32)
    result = bn.outputs[0]
    surgeon.detach(bn)
    return FoldedBatchNorm(surgeon.constant(f"{name}.weight", new_w), surgeon.constant(f"{name}.bias", new_b),
                           result, bn.name or result.name)


__all__ = ["FoldedBatchNorm", "fold_batchnorm", "inference_batchnorm_refusal"]
