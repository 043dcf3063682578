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


__all__ = ["EFFICIENCY", "GATHER_MACS", "INTERPOLATED_LAYER_MACS", "SPATIAL_FIXED_SHARE", "efficiency", "verdict"]
