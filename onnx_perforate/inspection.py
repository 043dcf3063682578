"""``onnx_perforate.inspect(model)``: the model's convolutions with shapes and MACs.

(The module is not called ``inspect`` so that it never shadows the standard library's.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import PerforateError
from .analysis import analyse
from .graph import QUANTIZED_CONVS, conv_geometry, format_shape, node_key


@dataclass
class ConvRecord:
    """One convolution node. ``macs`` is per image; ``perforable`` says whether ``rewrite`` accepts
    it, and ``reason`` why not."""

    name: str  # the key masks use: node name, or output tensor name for unnamed nodes
    op_type: str
    input_shape: tuple | None
    weight_shape: tuple | None
    output_shape: tuple | None
    kernel: tuple | None
    strides: tuple | None
    pads: tuple | None
    dilations: tuple | None
    group: int | None
    macs: int
    share: float  # fraction of all perforable Conv MACs
    perforable: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def inspect(model) -> list[ConvRecord]:
    """List every Conv / ConvInteger / QLinearConv of ``model`` (a ModelProto, a path or an
    :class:`~onnx_perforate.analysis.AnalysedModel`), in graph order."""
    analysed = analyse(model)
    model, shapes = analysed.model, analysed.shapes
    records = []
    for node in model.graph.node:
        if node.op_type != "Conv" and node.op_type not in QUANTIZED_CONVS:
            continue
        try:
            g = conv_geometry(node, shapes)
        except PerforateError as exc:
            records.append(_unsupported(node, shapes, str(exc)))
            continue
        a = g.attributes
        records.append(
            ConvRecord(g.key, node.op_type, g.input_shape, g.weight_shape, g.output_shape, a.kernel_shape,
                       a.strides, a.pads, a.dilations, a.group, g.macs, 0.0, True)
        )
    total = sum(r.macs for r in records)
    for r in records:
        r.share = r.macs / total if total else 0.0
    return records


def _unsupported(node, shapes, reason) -> ConvRecord:
    def shape(name):
        return shapes.get(name, (0, None))[1]

    w = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
    return ConvRecord(node_key(node), node.op_type, shape(node.input[0]), shape(w), shape(node.output[0]),
                      None, None, None, None, None, 0, 0.0, False, reason)


def format_table(records: list[ConvRecord]) -> str:
    """A plain-text table of ``inspect``'s records, with a total line."""
    header = ("name", "op", "input", "weight", "output", "kernel", "stride", "group", "MMACs", "share")
    rows = []
    for r in records:
        rows.append((
            r.name,
            r.op_type,
            format_shape(r.input_shape),
            format_shape(r.weight_shape),
            format_shape(r.output_shape),
            "x".join(map(str, r.kernel)) if r.kernel else "-",
            "x".join(map(str, r.strides)) if r.strides else "-",
            str(r.group) if r.group else "-",
            f"{r.macs / 1e6:.2f}" if r.perforable else "-",
            f"{r.share:.1%}" if r.perforable else "n/a: " + r.reason,
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    total = sum(r.macs for r in records)
    lines.append(f"{len(records)} convolution(s), {total / 1e6:.2f} MMACs per image in perforable Conv nodes")
    return "\n".join(lines)
