"""Replace Conv nodes by PerforatedConv + NNInterpolate (docs/rewriter.md).

The surgery is done with onnx-graphsurgeon on a private copy of the model; everything that can fail
(unknown nodes, bad masks, dynamic shapes, unsupported convolutions) is checked before the graph is
touched, and the result is checked with ``onnx.checker`` before it is returned.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ops
from ._library import DOMAIN, OPSET_VERSION
from .errors import EmptyMaskError, MaskShapeError, PerforateError, UnknownNodeError, UnsupportedNodeError
from .graph import (
    QUANTIZED_CONVS,
    ConvGeometry,
    _light_copy,
    conv_geometry,
    default_opset,
    find_node,
    infer_shapes,
    load_model,
    model_size,
    node_key,
)
from .masks import Mask, as_mask

log = logging.getLogger(__name__)

# Unary ops applied value by value: they commute with gathering positions (NNInterpolate).
_POSITIONWISE_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip")
# Binary ops that commute with NNInterpolate when the other operand is constant per channel.
_PER_CHANNEL_BINARY = ("Add", "Mul", "Sub", "Div")


# ----------------------------------------------------------------------------------------------------
# Report


@dataclass
class LayerReport:
    """What happened to one perforated Conv."""

    key: str  # the key the mask was given under
    node: str  # the PerforatedConv node's name
    output: str  # the tensor NNInterpolate produces (unchanged for downstream nodes)
    mask: dict
    macs: int
    perforated_macs: int
    folded_batchnorm: str | None = None
    fused_activation: str | None = None
    interpolated_late: list[str] = field(default_factory=list)  # ops now run on the compact tensor
    skipped: dict[str, str] = field(default_factory=dict)  # pass -> why it did not apply
    # compact pass (docs/compact.md): nodes that run on tensors compact with this layer's mask, the
    # consumers that needed the full tensor and why, and the layer whose compact output this one reads
    # through X_index
    compact: list[str] = field(default_factory=list)
    interpolated_for: dict[str, str] = field(default_factory=dict)
    implicit_input: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        done = []
        if self.folded_batchnorm:
            done.append(f"folded BatchNormalization {self.folded_batchnorm!r}")
        if self.fused_activation:
            done.append(f"fused {self.fused_activation}")
        if self.interpolated_late:
            done.append("interpolates after " + ", ".join(repr(n) for n in self.interpolated_late))
        out = [
            f"{self.node}: mask {self.mask['kind']} {self.mask['shape'][0]}x{self.mask['shape'][1]}, "
            f"skips {self.mask['achieved_rate']:.1%}; " + ("; ".join(done) if done else "no pass applied")
        ]
        out += [f"  {name}: {why}" for name, why in self.skipped.items()]
        if self.implicit_input:
            out.append(f"  input: compact output of {self.implicit_input!r} (no interpolation)")
        if self.compact:
            out.append("  stays compact through: " + ", ".join(self.compact))
        out += [f"  interpolated for {name}: {why}" for name, why in self.interpolated_for.items()]
        return out


@dataclass
class RewriteReport:
    """Per-layer record of a rewrite and model-level notes (IR version changes and the like)."""

    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_conv_macs: int = 0  # all Conv nodes of the model, per image
    compact_saved_macs: int = 0  # MACs of unperforated 1x1 Convs that now run on compact tensors

    @property
    def perforated_conv_macs(self) -> int:
        saved = sum(l.macs - l.perforated_macs for l in self.layers) + self.compact_saved_macs
        return self.total_conv_macs - saved

    @property
    def mac_reduction(self) -> float:
        """Theoretical speed-up of the convolutions: original MACs / perforated MACs."""
        return self.total_conv_macs / max(self.perforated_conv_macs, 1)

    def to_dict(self) -> dict:
        return {
            "layers": [l.to_dict() for l in self.layers],
            "notes": list(self.notes),
            "total_conv_macs": self.total_conv_macs,
            "compact_saved_macs": self.compact_saved_macs,
            "perforated_conv_macs": self.perforated_conv_macs,
            "conv_mac_reduction": round(self.mac_reduction, 4),
        }

    def format(self) -> str:
        lines = [line for layer in self.layers for line in layer.lines()]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(
            f"conv MACs per image: {self.total_conv_macs:,} -> {self.perforated_conv_macs:,} "
            f"({self.mac_reduction:.2f}x fewer)"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Public API


def rewrite(
    model,
    masks: dict,
    *,
    fuse: bool = True,
    compact: bool = True,
    fold_batchnorm: bool | None = None,
    fuse_activation: bool | None = None,
    interpolate_late: bool | None = None,
    compact_options=None,
) -> onnx.ModelProto:
    """Perforate the Conv nodes named in ``masks`` and return the new model (the input is untouched).

    ``masks`` maps a Conv's name (or, for an unnamed Conv, its output tensor's name) to a bool array
    [Ho, Wo] (True = computed) or a :class:`~onnx_perforate.masks.Mask`. ``fuse`` turns the three graph
    passes on or off together; ``fold_batchnorm``, ``fuse_activation`` and ``interpolate_late``
    override it one by one. ``compact`` (default) keeps perforated tensors compact through every
    position-wise consumer and lets perforated convolutions read compact inputs through ``X_index``
    (docs/compact.md); ``compact=False`` gives the explicit form (one NNInterpolate per perforated Conv).
    Use :func:`rewrite_with_report` to learn what each pass did.
    """
    return rewrite_with_report(
        model,
        masks,
        fuse=fuse,
        compact=compact,
        compact_options=compact_options,
        fold_batchnorm=fold_batchnorm,
        fuse_activation=fuse_activation,
        interpolate_late=interpolate_late,
    )[0]


def rewrite_with_report(
    model,
    masks: dict,
    *,
    fuse: bool = True,
    compact: bool = True,
    fold_batchnorm: bool | None = None,
    fuse_activation: bool | None = None,
    interpolate_late: bool | None = None,
    compact_options=None,
) -> tuple[onnx.ModelProto, RewriteReport]:
    """Like :func:`rewrite`, and also returns a :class:`RewriteReport`."""
    passes = _Passes(
        fold_batchnorm=fuse if fold_batchnorm is None else fold_batchnorm,
        fuse_activation=fuse if fuse_activation is None else fuse_activation,
        interpolate_late=fuse if interpolate_late is None else interpolate_late,
    )
    original = load_model(model)
    shapes = infer_shapes(original)
    plan = _plan(original, shapes, masks)
    report = RewriteReport(total_conv_macs=_total_conv_macs(original, shapes))

    graph = gs.import_onnx(original)
    surgeon = _Surgeon(graph, default_opset(original), passes)
    # Tensor names are unique (SSA), node names need not be: find the gs node by its output.
    by_output = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    for geometry, mask in plan:
        report.layers.append(surgeon.perforate(by_output[geometry.node.output[0]], geometry, mask))
    if compact:
        from .compact import propagate

        propagate(surgeon, shapes, original, report, surgeon.seeds, compact_options)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = _export(graph, original, report)
    _validate(result)
    for line in report.format().splitlines():
        log.debug("%s", line)
    return result, report


@dataclass
class _Passes:
    fold_batchnorm: bool
    fuse_activation: bool
    interpolate_late: bool


# ----------------------------------------------------------------------------------------------------
# Checking the request (before touching anything)


def _plan(model: onnx.ModelProto, shapes: dict, masks: dict) -> list[tuple[ConvGeometry, Mask]]:
    if not isinstance(masks, dict) or not masks:
        raise PerforateError("masks must be a non-empty dict {conv name: mask}")
    plan, seen = [], {}
    for key, value in masks.items():
        node = find_node(model, key)
        if node is None:
            raise UnknownNodeError(
                f"no Conv named {key!r} (nor producing a tensor of that name); Conv nodes: {_conv_names(model)}"
            )
        if node.op_type in ("PerforatedConv", "NNInterpolate") and node.domain == DOMAIN:
            raise UnsupportedNodeError(f"node {key!r} is already perforated ({node.op_type})")
        geometry = conv_geometry(node, shapes)
        if geometry.key in seen:
            raise PerforateError(f"Conv {geometry.key!r} is given two masks (keys {seen[geometry.key]!r} and {key!r})")
        seen[geometry.key] = key
        mask = as_mask(value)
        if mask.shape != geometry.out_hw:
            raise MaskShapeError(
                f"mask for Conv {geometry.key!r} has shape {list(mask.shape)}, expected the spatial size "
                f"of its output {geometry.node.output[0]!r}: {list(geometry.out_hw)}"
            )
        if mask.computed == 0:
            raise EmptyMaskError(f"mask for Conv {geometry.key!r} is all False: at least one position must be computed")
        plan.append((geometry, mask))
    order = {node_key(n): i for i, n in enumerate(model.graph.node)}
    return sorted(plan, key=lambda item: order[item[0].key])


def _conv_names(model) -> str:
    names = [node_key(n) for n in model.graph.node if n.op_type == "Conv" or n.op_type in QUANTIZED_CONVS]
    return ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "") if names else "none"


def _total_conv_macs(model, shapes) -> int:
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            try:
                total += conv_geometry(node, shapes).macs
            except PerforateError:
                pass  # not countable (dynamic or not 2-D); inspect() reports why
    return total


# ----------------------------------------------------------------------------------------------------
# Surgery


def _constant(tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        from .graph import constant_node_value

        node = tensor.inputs[0]
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        attrs = [onnx.helper.make_attribute(k, v) for k, v in node.attrs.items() if k.startswith("value_")]
        return constant_node_value(attrs)
    return None


def _describe(node) -> str:
    return f"{node.op} {node.name or node.outputs[0].name!r}"


def _bool_attr(node, name, default) -> int:
    return int(node.attrs.get(name, default))


class _Surgeon:
    def __init__(self, graph: gs.Graph, opset: int, passes: _Passes):
        self.graph = graph
        self.opset = opset
        self.passes = passes
        self.names = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}
        self.seeds: list = []  # (layer, its NNInterpolate, mask) for the compact pass

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def constant(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique(base), np.ascontiguousarray(value))

    def detach(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)

    def sole_consumer(self, tensor) -> tuple[gs.Node | None, str]:
        """The only node reading ``tensor``, or None and why there is none."""
        if tensor in self.graph.outputs:
            return None, f"{tensor.name!r} is a graph output"
        users = list(tensor.outputs)
        if len(users) != 1:
            return None, f"{tensor.name!r} has {len(users)} consumers" if users else f"{tensor.name!r} is unused"
        return users[0], ""

    # -- the Conv ----------------------------------------------------------------------------------

    def perforate(self, conv: gs.Node, geometry: ConvGeometry, mask: Mask) -> LayerReport:
        key = geometry.key
        name = conv.name or key
        attrs = copy.deepcopy(geometry.attributes)
        x, w = conv.inputs[0], conv.inputs[1]
        b = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
        out = conv.outputs[0]
        conv_output = out.name
        layer = LayerReport(
            key=key,
            node=name,
            output=out.name,
            mask=mask.to_dict(),
            macs=geometry.macs,
            perforated_macs=geometry.macs * mask.computed // mask.array.size,
        )
        self.detach(conv)

        if self.passes.fold_batchnorm:
            w, b, out = self.fold_batchnorm(name, w, b, out, layer)
        else:
            layer.skipped["fold_batchnorm"] = "turned off"
        if self.passes.fuse_activation:
            out = self.fuse_activation(attrs, out, layer)
        else:
            layer.skipped["fuse_activation"] = "turned off"

        batch, channels = geometry.output_shape[0], geometry.weight_shape[0]
        compact_shape = [batch, channels, mask.computed]
        compact = gs.Variable(self.unique(f"{conv_output}.compact"), dtype=np.float32, shape=compact_shape)
        mask_tensor = self.constant(f"{key}.mask", mask.array.astype(bool))
        b_input = b if b is not None else gs.Variable.empty()
        self.names.add(name)
        self.graph.nodes.append(
            gs.Node("PerforatedConv", name=name, domain=DOMAIN, attrs=attrs.to_onnx(),
                    inputs=[x, w, b_input, mask_tensor], outputs=[compact])
        )

        if self.passes.interpolate_late:
            compact, out = self.interpolate_late(compact, out, compact_shape, layer)
        else:
            layer.skipped["interpolate_late"] = "turned off"

        index = self.constant(f"{key}.nn_index", ops.nearest_index(mask.array))
        out.dtype, out.shape = np.float32, [batch, channels, *geometry.out_hw]
        interpolate = gs.Node("NNInterpolate", name=self.unique(f"{name}/interpolate"), domain=DOMAIN,
                              inputs=[compact, index], outputs=[out])
        self.graph.nodes.append(interpolate)
        self.seeds.append((layer, interpolate, mask.array.astype(bool)))
        layer.output = out.name
        return layer

    # -- BatchNormalization folding ----------------------------------------------------------------

    def fold_batchnorm(self, name, w, b, out, layer):
        bn, why = self.sole_consumer(out)
        if bn is None or bn.op != "BatchNormalization":
            layer.skipped["fold_batchnorm"] = why or f"next op is {_describe(bn)}, not BatchNormalization"
            return w, b, out
        why = self._batchnorm_unusable(bn)
        params = [_constant(t) for t in bn.inputs[1:5]]
        weight, bias = _constant(w), (None if b is None else _constant(b))
        if not why and any(p is None for p in params):
            why = f"BatchNormalization {bn.name!r} has non-constant parameters"
        if not why and (weight is None or (b is not None and bias is None)):
            why = "the Conv's weight or bias is not constant"
        if why:
            layer.skipped["fold_batchnorm"] = why
            return w, b, out
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        new_w = (weight.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
        base = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
        new_b = ((base - mean) * scale + beta).astype(np.float32)
        result = bn.outputs[0]
        self.detach(bn)
        layer.folded_batchnorm = bn.name or result.name
        return self.constant(f"{name}.weight", new_w), self.constant(f"{name}.bias", new_b), result

    def _batchnorm_unusable(self, bn) -> str:
        """Why ``bn`` is not an inference-mode, single-output BatchNormalization ('' if it is)."""
        if _bool_attr(bn, "training_mode", 0):
            return f"BatchNormalization {bn.name!r} is in training mode"
        if self.opset < 7 and not _bool_attr(bn, "is_test", 0):
            return f"BatchNormalization {bn.name!r} has is_test=0 (training)"
        if 7 <= self.opset < 9 and not _bool_attr(bn, "spatial", 1):
            return f"BatchNormalization {bn.name!r} has spatial=0 (per-position statistics)"
        if any(t.outputs or t in self.graph.outputs for t in bn.outputs[1:]):
            return f"BatchNormalization {bn.name!r} uses its running statistics outputs"
        return ""

    # -- activation fusion -------------------------------------------------------------------------

    def fuse_activation(self, attrs: ops.ConvAttributes, out, layer):
        act, why = self.sole_consumer(out)
        if act is None or act.op not in ("Relu", "LeakyRelu", "Clip"):
            layer.skipped["fuse_activation"] = why or f"next op is {_describe(act)}, not Relu/LeakyRelu/Clip"
            return out
        if act.op == "Clip":
            bounds = self._clip_bounds(act)
            if bounds is None:
                layer.skipped["fuse_activation"] = f"Clip {act.name!r} has non-constant bounds"
                return out
            attrs.clip_min, attrs.clip_max = bounds
        if act.op == "LeakyRelu":
            attrs.alpha = float(act.attrs.get("alpha", 0.01))
        attrs.activation = act.op
        result = act.outputs[0]
        self.detach(act)
        layer.fused_activation = act.op
        return result

    def _clip_bounds(self, clip) -> tuple[float, float] | None:
        if self.opset < 11:
            return float(clip.attrs.get("min", -ops.FLOAT32_MAX)), float(clip.attrs.get("max", ops.FLOAT32_MAX))
        bounds = []
        for i, default in ((1, -ops.FLOAT32_MAX), (2, ops.FLOAT32_MAX)):
            if len(clip.inputs) <= i or not clip.inputs[i].name:
                bounds.append(default)
                continue
            value = _constant(clip.inputs[i])
            if value is None or value.size != 1:
                return None
            bounds.append(float(value.reshape(())))
        return bounds[0], bounds[1]

    # -- interpolate late --------------------------------------------------------------------------

    def interpolate_late(self, compact, out, compact_shape, layer):
        """Move position-wise ops that follow ``out`` before the interpolation, one at a time."""
        while True:
            op, why = self.sole_consumer(out)
            if op is None:
                layer.skipped["interpolate_late"] = f"stopped: {why}"
                return compact, out
            why = self._commutes(op, out, compact_shape[1])
            if why:
                layer.skipped["interpolate_late"] = f"stopped at {_describe(op)}: {why}"
                return compact, out
            result = op.outputs[0]
            moved = gs.Variable(self.unique(f"{result.name}.compact"), dtype=np.float32, shape=list(compact_shape))
            for i, tensor in enumerate(list(op.inputs)):
                if tensor is out:
                    op.inputs[i] = compact
                elif op.op in _PER_CHANNEL_BINARY:
                    value = _constant(tensor)
                    channels = value.size if value.size > 1 else 1
                    op.inputs[i] = self.constant(f"{op.name or result.name}.compact_param", value.reshape(channels, 1))
            op.outputs[0] = moved
            layer.interpolated_late.append(op.name or result.name)
            compact, out = moved, result

    def _commutes(self, op, tensor, channels) -> str:
        """'' when ``op`` applied to ``tensor`` [N, C, H, W] gives the same result on [N, C, K]."""
        if op.op in _POSITIONWISE_UNARY:
            return ""
        if op.op == "BatchNormalization":
            # BatchNormalization is defined for [N, C, D1, ...]: rank 3 is as valid as rank 4.
            return self._batchnorm_unusable(op) or ""
        if op.op in _PER_CHANNEL_BINARY:
            if list(op.inputs).count(tensor) != 1:
                return "both operands are the Conv's output"
            other = next(t for t in op.inputs if t is not tensor)
            value = _constant(other)
            if value is None:
                return f"operand {other.name!r} is not constant"
            return _per_channel_reason(value, other.name, channels)
        return "does not commute with nearest-neighbour interpolation"


def _per_channel_reason(value: np.ndarray, name: str, channels) -> str:
    """'' when a constant float32 operand broadcasts per channel (or is a scalar) against [N, C, H, W]."""
    if value.dtype != np.float32:
        return f"operand {name!r} is {value.dtype}, expected float32"
    padded = (1,) * (4 - value.ndim) + value.shape if value.ndim <= 4 else None
    if padded is None or padded[0] != 1 or padded[2:] != (1, 1) or padded[1] not in (1, channels):
        return f"operand {name!r} of shape {list(value.shape)} is not per-channel"
    return ""


# ----------------------------------------------------------------------------------------------------
# Export and validation


def _export(graph: gs.Graph, original: onnx.ModelProto, report: RewriteReport) -> onnx.ModelProto:
    imports = [entry for entry in original.opset_import if entry.domain != DOMAIN]
    for entry in original.opset_import:
        if entry.domain == DOMAIN and entry.version != OPSET_VERSION:
            raise PerforateError(f"model imports domain {DOMAIN!r} version {entry.version}, expected {OPSET_VERSION}")
    imports.append(ops.opset_import())
    model = gs.export_onnx(graph, opset_imports=imports)
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(original, name))
    model.metadata_props.extend(original.metadata_props)
    initializers = {t.name for t in model.graph.initializer}
    if original.ir_version < 4:
        # IR 3 wants every initializer listed as a graph input; ORT then still treats them as
        # constants, which it would not do for IR >= 4. Raising the IR version and dropping those
        # inputs keeps the weights constant for ORT (the opset is unchanged).
        model.ir_version = 4
        report.notes.append(
            f"IR version raised from {original.ir_version} to 4; initializers are no longer listed as graph inputs"
        )
    else:
        model.ir_version = original.ir_version
        _restore_inputs(model, original, initializers)
    return model


def _restore_inputs(model, original, initializers) -> None:
    """Keep graph inputs that are also initializers (overridable defaults), in their original order."""
    exported = {vi.name: vi for vi in model.graph.input}
    restored = [
        exported.get(vi.name, vi)
        for vi in original.graph.input
        if vi.name in exported or vi.name in initializers
    ]
    del model.graph.input[:]
    model.graph.input.extend(restored)


def _validate(model: onnx.ModelProto) -> None:
    try:
        checked = model if model_size(model) < 2**31 - (64 << 20) else _light_copy(model)
        onnx.checker.check_model(checked, full_check=True)
        onnx.shape_inference.infer_shapes(checked, check_type=True, strict_mode=False)
    except Exception as exc:
        raise PerforateError(f"internal error: the rewritten model does not validate: {exc}") from exc


def save(model: onnx.ModelProto, path: str | os.PathLike, **kwargs) -> None:
    """Save atomically (see :func:`onnx_perforate.graph.save_model`)."""
    from .graph import save_model

    save_model(model, path, **kwargs)
