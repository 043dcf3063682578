"""Whether perforating a layer pays on the CPU: a cost model in MAC-equivalents of ONNX Runtime's Conv.

A perforated layer runs its ``perforated_macs`` at our kernel's efficiency relative to ORT's Conv (lower
for short reductions: the patch C/group * kH * kW), plus a fixed share of the dense layer's time for a
spatial kernel (the padded copy of its input). When its output has to be interpolated for a consumer,
it also pays one gather per output element (NNInterpolate) and a fixed cost per layer (a second node,
and the layout reorders ORT puts around it). Perforating pays when

    macs * (1 - (perforated_macs / macs) / efficiency(patch) - fixed share)  >  interpolation cost

Constants fitted to one-thread per-node profiles of SqueezeNet on the reference machine
(docs/benchmarks.md, "Light perforation"): ORT's Conv spends about 8 ps per MAC on its 3x3 layers,
NNInterpolate 0.24 ns per float (= 30 MACs), a perforated 3x3 layer takes 0.88x ORT's time at r = 0.3
and 0.41x at r = 0.75 (efficiency 0.95 plus a fixed 14%), the reorders and dispatch ~0.015 ms.
"""

from __future__ import annotations

import onnx

from ..graph import consumers
from ..runtime import cpu_flags
from .op_table import NCHWC_FOLLOWERS, Semantics, semantics

# One interpolated float costs what ORT's Conv spends on this many MACs.
GATHER_MACS = 30
# Dispatch of the NNInterpolate node and ORT's layout reorders around an interpolated layer.
INTERPOLATED_LAYER_MACS = 2_000_000
# Share of the dense layer's time a perforated spatial kernel spends whatever its mask (padded copy).
SPATIAL_FIXED_SHARE = 0.14

# Our kernel's speed relative to ORT's Conv on the computed positions, by patch size (C/group * kH * kW),
# measured on SqueezeNet's layers: (smallest patch, efficiency), largest first.
EFFICIENCY = ((144, 0.95), (64, 0.8), (16, 0.6), (0, 0.5))


def efficiency(patch: int) -> float:
    return next(e for smallest, e in EFFICIENCY if patch >= smallest)


def verdict(macs: int, perforated_macs: int, out_elements: int, spatial: bool, interpolated: bool) -> str:
    """'' when perforating is predicted to pay, else why not (in MAC-equivalents)."""
    patch = macs // max(out_elements, 1)
    share = perforated_macs / max(macs, 1) / efficiency(patch) + (SPATIAL_FIXED_SHARE if spatial else 0.0)
    gain = macs * (1 - share)
    cost = out_elements * GATHER_MACS + INTERPOLATED_LAYER_MACS if interpolated else 0
    if gain > cost:
        return ""
    what = f"saves {gain / 1e6:.2f} M MAC-equivalents at {efficiency(patch):.0%} kernel efficiency (patch {patch})"
    if interpolated:
        what += f", its interpolation costs {cost / 1e6:.2f} M"
    return f"kept as plain Conv: perforating {what}"


# ----------------------------------------------------------------------------------------------------
# Layout: ORT's NCHWc transformer next to the custom ops
#
# ORT runs its Convs (and the pooling, Concat and element-wise ops between them) in a blocked NCHWc
# layout; custom ops read and write plain NCHW, so ORT reorders every tensor that crosses between the
# two. Decided by measurement (docs/benchmarks.md, "Light perforation"): the transformer stays on.
# Turning it off (session option disabled_optimizers=["NchwcTransformer"]) removes the reorders but
# runs the remaining Convs and pools as plain NCHW kernels, which was slower on SqueezeNet.

_POOLS = ("MaxPool", "AveragePool")
_BLOCK_ALIGNED = ("Concat", "GlobalMaxPool", "GlobalAveragePool")  # and each input's channels a multiple of the block


def nchwc_block() -> int:
    """Channels per NCHWc block on this CPU: 16 with AVX-512, else 8."""
    return 16 if "avx512f" in cpu_flags() else 8


def nchwc_reorders(model: onnx.ModelProto, block: int | None = None) -> list[str]:
    """The tensors ORT's NCHWc transformer is expected to reorder between its blocked layout and the
    custom ops' NCHW (one ReorderInput or ReorderOutput each), for NCHWc blocks of ``block`` channels
    (default: this CPU's). A prediction of ORT's rules, checked against ORT's optimised graphs in
    tests/test_profitability.py: plain 2-D Convs run blocked; max and average pools do when their
    channel count is known (ORT infers no shape through a custom op) and a multiple of the block;
    activations, Concat, Add/Sum/Mul, global pools and inference Dropout/Identity do when all their
    tensor inputs are blocked (Concat's and global pools' each a multiple of the block); graph outputs,
    and a Conv with fewer than 8 input channels (a first layer), read NCHW."""
    block = block or nchwc_block()
    graph = model.graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    weights.update({out: [] for n in graph.node if n.op_type == "Constant" for out in n.output})
    channels = _known_channels(model, weights)
    blocked: set[str] = set()  # output tensor names of the nodes that run blocked
    for node in graph.node:  # a topological order, as ONNX requires
        tensors = [i for i in node.input if i and i not in weights]
        if node.domain not in ("", "ai.onnx"):
            runs_blocked = False
        elif node.op_type == "Conv":
            runs_blocked = True
        elif node.op_type in _POOLS:
            runs_blocked = bool(tensors) and channels.get(tensors[0], 0) % block == 0 and tensors[0] in channels
        elif node.op_type in NCHWC_FOLLOWERS:
            data = tensors[:1] if semantics(node.op_type) in (Semantics.UNARY, Semantics.IDENTITY) else tensors
            runs_blocked = bool(data) and all(t in blocked for t in data)
            if node.op_type in _BLOCK_ALIGNED:
                runs_blocked = runs_blocked and all(channels.get(t, 1) % block == 0 for t in data)
        else:
            runs_blocked = False
        if runs_blocked:
            blocked.update(node.output)
    readers_of = consumers(model)
    outputs = {o.name for o in graph.output}
    reorders = []
    for tensor in [*(i.name for i in graph.input if i.name not in weights), *(o for n in graph.node for o in n.output)]:
        readers = readers_of.get(tensor, [])
        if tensor in blocked:  # read as NCHW by a plain-layout node or as a graph output
            if tensor in outputs or any(not _runs_blocked(r, blocked) for r in readers):
                reorders.append(tensor)
        elif any(_runs_blocked(r, blocked) and not _reads_nchw(r, weights) for r in readers):
            reorders.append(tensor)
    return reorders


def _known_channels(model: onnx.ModelProto, weights: dict) -> dict[str, int]:
    """{tensor: channel count} where ORT knows it: from the model's shape records, and through the
    standard ops after them (ORT infers no shape through a custom op without one)."""
    graph = model.graph
    known = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            known[info.name] = dims[1].dim_value
    for node in graph.node:
        tensors = [i for i in node.input if i and i not in weights]
        if node.domain not in ("", "ai.onnx") or not tensors or not all(t in known for t in tensors):
            continue
        if node.op_type == "Conv" and weights.get(node.input[1]):
            value = weights[node.input[1]][0]
        elif node.op_type == "Concat":
            value = sum(known[t] for t in tensors)
        else:
            value = known[tensors[0]]
        for out in node.output[:1]:
            known.setdefault(out, value)
    return known


def _runs_blocked(node, blocked: set[str]) -> bool:
    return any(out in blocked for out in node.output)


def _reads_nchw(node, weights: dict) -> bool:
    """A first-layer style Conv (fewer input channels than any NCHWc block) reads plain NCHW directly."""
    if node.op_type != "Conv" or len(node.input) < 2 or not weights.get(node.input[1]):
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return weights[node.input[1]][1] * group < 8


__all__ = ["EFFICIENCY", "GATHER_MACS", "INTERPOLATED_LAYER_MACS", "SPATIAL_FIXED_SHARE", "efficiency",
           "nchwc_block", "nchwc_reorders", "verdict"]
