"""Compact propagation: keep perforated tensors as [N, C, K] for as long as the graph allows
(docs/compact.md).

``rewrite`` first replaces every perforated Conv by PerforatedConv + NNInterpolate (the *explicit*
form). This pass then walks the graph in topological order with a map {full tensor -> its compact
form (tensor [N, C, K], interpolation index [H, W])} and moves every consumer that is position-wise
for that index onto the compact tensor:

- element-wise ops (unary, per-channel constants, and Add/Mul/... of compact tensors with the *same*
  index, e.g. residual connections), inference BatchNormalization, inference Dropout (removed);
- channel Concat of compact tensors with the same index;
- unperforated 1x1 Conv (stride 1, no padding): PerforatedConv on the compact tensor viewed as
  [N, C, 1, K] with an all-ones [1, K] mask (bias and a following activation fused);
- perforated convolutions (PerforatedConv, PerforatedQLinearConv): they read the compact tensor through
  the producer's index (the ``X_index`` input), so the interpolated tensor never exists;
- per-tensor DequantizeLinear / QuantizeLinear (QDQ models: a PerforatedQLinearConv's compact output is
  8-bit), except a DequantizeLinear read by what ORT runs in 8 bits on the full tensor;
- GlobalAveragePool / ReduceMean / ReduceSum over space: a MatMul with the positions' multiplicities
  (how many grid positions each computed one fills); GlobalMaxPool / ReduceMax: a max over K;
- MaxPool / AveragePool: CompactPool, which reads the compact tensor through the index. Its output is
  compact again when its readers are 1x1 PerforatedConvs sharing one mask (only their positions are
  pooled) or when windows repeat (equal windows give equal outputs); else it is the full tensor.

Whatever else reads a compact tensor's full name gets one shared NNInterpolate that produces it under
its original name, so the rest of the graph is untouched. Every rewrite is exact: it computes what the
explicit form computes, only on fewer positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ops
from .._library import DOMAIN
from ..errors import PerforateError
from ..graph import conv_geometry
from .activation import fuse_activation
from .op_table import Semantics, is_channel_axis, ops_with
from .position_wise import MOVABLE, operand_replacements
from .profitability import nchwc_block
from .surgery import Refusal, Surgeon, constant_value, extra_outputs_used, node_name


@dataclass
class Compact:
    """The compact form of a full tensor [N, C, H, W]: ``tensor`` [N, C, K] with full[..., y, x] =
    tensor[..., index[y, x]]."""

    tensor: gs.Variable
    index: gs.Constant  # int64 [H, W]
    mask: np.ndarray  # bool [H, W], the computed positions (row-major order = the order along K)
    layer: object  # the LayerReport of the PerforatedConv whose mask this is (for the report)
    producer: str  # name of the node that now writes ``tensor`` (names the NNInterpolate if one is needed)

    @property
    def k(self) -> int:
        return int(self.index.values.max()) + 1


@dataclass
class CompactOptions:
    # Unperforated spatial Convs reading a compact tensor: True runs them as PerforatedConv with an
    # all-ones mask and X_index (implicit interpolation); False keeps NNInterpolate + ORT Conv. ORT's
    # dense Conv measured faster than our kernel at full density on SqueezeNet shapes (docs/compact.md).
    implicit_unperforated_spatial: bool = False
    # MaxPool / AveragePool reading a compact tensor run as CompactPool (no NNInterpolate); False keeps
    # NNInterpolate + ONNX pooling.
    compact_pooling: bool = True
    # A pooled output stays compact by window deduplication only when it has at most this fraction of
    # the grid's positions (above it, the saving does not pay for the interpolation it may need later).
    pooled_compact_fraction: float = 0.75
    # Cost model of a full-output CompactPool, in units of one gathered float: CompactPool reads its
    # windows' distinct entries (about one unit each); NNInterpolate + ORT's pooling gathers H*W floats
    # and then reads every window element with SIMD (about 1/8 unit each). Measured on SqueezeNet's
    # pool1 (docs/benchmarks.md): CompactPool 0.09 ms against 0.24 ms at grid r=0.75 (13530 entries
    # per plane against a cost of 15724), 0.36 ms against 0.25 ms at grid r=0.5 (18150 against 15724).
    pool_window_read_cost: float = 1 / 8
    # ... plus, when ORT runs that pool in its NCHWc layout (channels a multiple of the block), the
    # ReorderInput it puts before it, less the reorder of the smaller pooled tensor CompactPool's NCHW
    # output then needs: this many units per element. On SqueezeNet's pool1 (uniform r = 0.3, 1 thread,
    # AVX2) ReorderInput took 0.40-0.53 ms, as long as NNInterpolate itself; pooling it compactly made the
    # whole network 4-7% faster at 1 thread, 1% at 2 (docs/benchmarks.md). 0 leaves the reorders out.
    pool_reorder_cost: float = 1.0


class CompactPass:
    """The walk; ``visit`` dispatches each node reading a compact tensor through ``HANDLERS``."""

    def __init__(self, surgeon: Surgeon, shapes: dict, original: onnx.ModelProto, report, options: CompactOptions,
                 fuse_activations: bool = True):
        self.s = surgeon
        self.fuse_activations = fuse_activations
        self.graph = surgeon.graph
        self.shapes = shapes
        self.report = report
        self.options = options
        self.protos = {n.output[0]: n for n in original.graph.node if n.output}
        self.layers = {layer.node: layer for layer in report.layers}
        self.state: dict[str, tuple[gs.Variable, Compact]] = {}  # full tensor name -> (tensor, compact)
        self.indices: dict[bytes, gs.Constant] = {}  # one initializer per distinct index
        self.views: dict[str, gs.Variable] = {}  # compact tensor name -> its [N, C, 1, K] view

    # -- bookkeeping -------------------------------------------------------------------------------

    def canonical_index(self, index: gs.Constant) -> gs.Constant:
        values = np.asarray(index.values)
        key = values.tobytes() + repr(values.shape).encode()
        return self.indices.setdefault(key, index)

    def seed(self, layer, interpolate: gs.Node, mask: np.ndarray) -> None:
        """Register an NNInterpolate written by ``_Surgeon.perforate``: its output has a compact form."""
        compact, index = interpolate.inputs
        full = interpolate.outputs[0]
        self.state[full.name] = (full, Compact(compact, self.canonical_index(index), mask, layer, layer.node))

    def compact_of(self, tensor) -> Compact | None:
        entry = self.state.get(tensor.name)
        return entry[1] if entry is not None and entry[0] is tensor else None

    def full_dims(self, name: str):
        dims = self.shapes.get(name, (0, None))[1]
        return list(dims) if dims is not None and len(dims) == 4 else None

    def new_compact(self, full: gs.Variable, channels, like: Compact, producer: str, dtype=None) -> gs.Variable:
        """A compact tensor standing for ``full``, with ``like``'s index; of ``like``'s type unless given."""
        dims = self.full_dims(full.name)
        batch = dims[0] if dims else like.tensor.shape[0] if like.tensor.shape else None
        channels = channels if channels is not None else (dims[1] if dims else None)
        dtype = dtype if dtype is not None else _element_type(like.tensor)
        tensor = gs.Variable(self.s.unique(f"{full.name}.compact"), dtype=dtype, shape=[batch, channels, like.k])
        self.state[full.name] = (full, Compact(tensor, like.index, like.mask, like.layer, producer))
        return tensor

    def channels(self, compact: Compact):
        shape = compact.tensor.shape
        return shape[1] if shape else None

    def refuse(self, node: gs.Node, inputs: list[Compact], refusal: Refusal) -> None:
        for compact in {id(c.layer): c for c in inputs}.values():
            compact.layer.interpolated_for[node_name(node)] = refusal.reason

    def stayed(self, name: str, compact: Compact, how: str = "") -> None:
        compact.layer.compact.append(name + (f" ({how})" if how else ""))

    # -- the walk ----------------------------------------------------------------------------------

    def run(self) -> None:
        self.graph.toposort()
        for node in list(self.graph.nodes):
            inputs = [c for c in (self.compact_of(t) for t in node.inputs) if c is not None]
            if not inputs:
                continue  # not reading a compact tensor (or detached by an earlier fusion)
            refusal = self.visit(node, inputs)
            if refusal:
                self.refuse(node, inputs, refusal)
        self.materialise()

    def visit(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        """Move ``node`` onto compact tensors; None when done, else why it needs the full tensor."""
        if node.domain == DOMAIN:
            handler = CUSTOM_HANDLERS.get(node.op)
        elif node.domain not in ("", "ai.onnx", None):
            return Refusal(f"unknown op {node.domain}.{node.op}", node.name)
        else:
            handler = HANDLERS.get(node.op)
        if handler is None:
            return Refusal(f"{node.op} needs the full tensor", node.name)
        return handler(self, node, inputs)

    # -- element-wise ------------------------------------------------------------------------------

    def position_wise(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        name = node_name(node)
        first = inputs[0]
        if any(not np.array_equal(c.index.values, first.index.values) for c in inputs[1:]):
            return Refusal("its compact operands have different masks", node.name)
        if extra_outputs_used(self.graph, node):
            return Refusal(f"{node.op} uses its extra outputs", node.name)
        channels = self.channels(first)
        replacements = operand_replacements(self.s, node, lambda t: self.compact_of(t) is not None, channels)
        if isinstance(replacements, Refusal):
            return replacements
        for i, tensor in enumerate(list(node.inputs)):
            compact = self.compact_of(tensor)
            if compact is not None:
                node.inputs[i] = compact.tensor
            elif i in replacements:
                node.inputs[i] = replacements[i]
        full = node.outputs[0]
        while len(node.outputs) > 1:  # unused extra outputs (checked above)
            node.outputs.pop()
        node.outputs[0] = self.new_compact(full, channels, first, name)
        self.stayed(name, first)
        return None

    def dropout(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        compact = inputs[0]
        if self.compact_of(node.inputs[0]) is not compact:
            return Refusal("the compact tensor is not Dropout's data input", node.name)
        if len(node.inputs) > 2 and node.inputs[2].name:
            training = constant_value(node.inputs[2])
            if training is None or bool(training.reshape(-1)[0]):
                return Refusal("Dropout may be in training mode", node.name)
        if extra_outputs_used(self.graph, node):
            return Refusal("Dropout's mask output is used", node.name)
        if node.attrs.get("is_test", 1) == 0 and self.s.opset < 7:
            return Refusal("Dropout has is_test=0 (training)", node.name)
        # Inference Dropout is the identity: drop it and let its output stand for the same compact tensor.
        full, name = node.outputs[0], node_name(node)
        self.s.detach(node)
        self.state[full.name] = (full, compact)
        self.stayed(name, compact, "removed: identity at inference")
        return None

    def quantize(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        """DequantizeLinear / QuantizeLinear with per-tensor parameters: position-wise, with a change of
        type (8-bit <-> float32), so a QDQ graph stays compact between quantized convolutions."""
        compact = inputs[0]
        if self.compact_of(node.inputs[0]) is not compact:
            return Refusal(f"the compact tensor is not {node.op}'s input", node.name)
        params = [constant_value(t) if t.name else None for t in node.inputs[1:3]]
        if params[0] is None or params[0].size != 1 or (len(node.inputs) > 2 and node.inputs[2].name
                                                          and (params[1] is None or params[1].size != 1)):
            return Refusal(f"{node.op} has non-constant or per-axis parameters", node.name)
        full = node.outputs[0]
        if not full.outputs and full not in self.graph.outputs:
            self.s.detach(node)  # the input of a quantized convolution that now reads the 8-bit tensor
            return None
        if node.op == "DequantizeLinear":
            dtype = np.float32
            # ORT runs these consumers in 8 bits on the full tensor (QLinearConv, its uint8 pooling);
            # on the compact float tensor they would run in float.
            eight_bit = [r for r in full.outputs if r.op in EIGHT_BIT_READERS]
            if eight_bit:
                return Refusal(f"its output is read by {eight_bit[0].op} {node_name(eight_bit[0])!r}, which "
                               "runs on the 8-bit full tensor", node.name)
        else:
            output_dtype = int(node.attrs.get("output_dtype", 0))
            if params[1] is not None:
                dtype = params[1].dtype
            elif output_dtype:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(output_dtype)
            else:
                dtype = np.uint8
        node.inputs[0] = compact.tensor
        node.outputs[0] = self.new_compact(full, self.channels(compact), compact, node_name(node), dtype)
        self.stayed(node_name(node), compact)
        return None

    def concat(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        dims = self.full_dims(node.outputs[0].name)
        name = node_name(node)
        axis = int(node.attrs.get("axis", 1))
        if not is_channel_axis(axis):
            return Refusal(f"Concat along axis {axis}, not channels", node.name)
        compacts = [self.compact_of(t) for t in node.inputs]
        if any(c is None for c in compacts):
            return Refusal("some of its inputs are full tensors", node.name)
        if any(not np.array_equal(c.index.values, compacts[0].index.values) for c in compacts[1:]):
            return Refusal("its inputs have different masks", node.name)
        for i, c in enumerate(compacts):
            node.inputs[i] = c.tensor
        node.attrs["axis"] = 1
        node.outputs[0] = self.new_compact(node.outputs[0], dims[1] if dims else None, compacts[0], name)
        self.stayed(name, compacts[0])
        return None

    # -- convolutions ------------------------------------------------------------------------------

    def view(self, compact: Compact, consumer: str) -> gs.Variable:
        """The compact tensor as [N, C, 1, K] (a Reshape: no copy in ORT), one per compact tensor."""
        cached = self.views.get(compact.tensor.name)
        if cached is not None:
            return cached
        k = compact.k
        shape = compact.tensor.shape or [None, None, k]
        view = gs.Variable(self.s.unique(f"{compact.tensor.name}.view"), dtype=_element_type(compact.tensor),
                           shape=[shape[0], shape[1], 1, k])
        target = self.s.constant(f"{compact.tensor.name}.view_shape", np.array([0, 0, 1, k], dtype=np.int64))
        self.graph.nodes.append(gs.Node("Reshape", name=self.s.unique(f"{consumer}/view"), inputs=[compact.tensor, target],
                                        outputs=[view]))
        self.views[compact.tensor.name] = view
        return view

    def perforated_conv(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        """PerforatedConv or PerforatedQLinearConv (mask and X_index at other positions) reading ``inputs[0]``."""
        compact = inputs[0]
        mask_at = MASK_INPUT[node.op]
        if self.compact_of(node.inputs[0]) is not compact:
            return Refusal(f"the compact tensor is not {node.op}'s input X", node.name)
        if len(node.inputs) > mask_at + 1:
            return Refusal(f"{node.op} already reads a compact input", node.name)
        attrs = node.attrs
        own_mask = np.asarray(node.inputs[mask_at].values) if isinstance(node.inputs[mask_at], gs.Constant) else None
        if (list(attrs.get("kernel_shape", [])) == [1, 1] and list(attrs.get("strides", [1, 1])) == [1, 1]
                and not any(attrs.get("pads", [0, 0, 0, 0])) and own_mask is not None
                and own_mask.shape == compact.mask.shape and np.array_equal(own_mask.astype(bool), compact.mask)):
            # A 1x1 conv perforated with its input's mask computes exactly the input's positions: a
            # GEMM on the compact tensor, no gather (the X_index path gathers, which costs more here).
            k = compact.k
            # PerforatedQLinearConv reads [N, C, K] itself as one row (no Reshape node to run).
            node.inputs[0] = compact.tensor if node.op == "PerforatedQLinearConv" else self.view(compact, node_name(node))
            node.inputs[mask_at] = self.s.constant(f"{node_name(node)}.compact_mask", np.ones((1, k), dtype=bool))
            self.stayed(node_name(node), compact, "1x1 GEMM on the compact input, same mask")
            layer = self.layers.get(node.name)
            if layer is not None:
                layer.implicit_input = compact.layer.node
            return None
        node.inputs[0] = compact.tensor
        node.inputs.append(compact.index)
        self.stayed(node_name(node), compact, "reads it through X_index")
        layer = self.layers.get(node.name)
        if layer is not None:
            layer.implicit_input = compact.layer.node
        return None

    def conv(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        compact = inputs[0]
        proto = self.protos.get(node.outputs[0].name)
        if proto is None or self.compact_of(node.inputs[0]) is not compact:
            return Refusal("the compact tensor is not the Conv's input X", node.name)
        try:
            geometry = conv_geometry(proto, self.shapes)
        except PerforateError as exc:
            return Refusal(str(exc), node.name)
        attrs = geometry.attributes
        pointwise = tuple(attrs.kernel_shape) == (1, 1) and tuple(attrs.strides) == (1, 1) and not any(attrs.pads)
        if pointwise:
            return self.pointwise_conv(node, compact, geometry)
        if not self.options.implicit_unperforated_spatial:
            return Refusal("unperforated spatial Conv: NNInterpolate + ONNX Conv is faster than implicit "
                           "interpolation", node.name)
        return self.implicit_conv(node, compact, geometry)

    def fused_output(self, attrs, full):
        """Fuse the activation that follows an unperforated Conv (when activations are fused at all)."""
        if not self.fuse_activations:
            return full
        fused = fuse_activation(self.s, attrs, full)
        return full if isinstance(fused, Refusal) else fused

    def pointwise_conv(self, node: gs.Node, compact: Compact, geometry) -> None:
        """1x1 Conv on [N, C, K]: PerforatedConv on the [N, C, 1, K] view with an all-ones [1, K] mask
        (a plain GEMM with fused bias and activation; as fast as MatMul + Add here, docs/compact.md)."""
        k = compact.k
        name = node_name(node)
        view = self.view(compact, name)
        attrs = geometry.attributes
        full = node.outputs[0]
        full = self.fused_output(attrs, full)
        mask = self.s.constant(f"{name}.compact_mask", np.ones((1, k), dtype=bool))
        inputs = [view, node.inputs[1], _bias(node), mask]
        out = self.new_compact(full, geometry.weight_shape[0], compact, name)
        self.s.detach(node)
        self.graph.nodes.append(gs.Node("PerforatedConv", name=name, domain=DOMAIN, attrs=attrs.to_onnx(),
                                        inputs=inputs, outputs=[out]))
        hw = geometry.out_hw[0] * geometry.out_hw[1]
        self.report.compact_saved_macs += geometry.macs - geometry.macs * k // hw
        self.stayed(name, compact, "1x1 GEMM" + (f" + {attrs.activation}" if attrs.activation else ""))
        return None

    def implicit_conv(self, node: gs.Node, compact: Compact, geometry) -> None:
        """An unperforated spatial Conv as PerforatedConv(all-ones mask, X_index); its dense output is
        [N, M, Ho*Wo] and a Reshape (no copy) restores [N, M, Ho, Wo] under the original name."""
        name = node_name(node)
        attrs = geometry.attributes
        full = node.outputs[0]
        full = self.fused_output(attrs, full)
        ho, wo = geometry.out_hw
        dense = gs.Variable(self.s.unique(f"{full.name}.dense"), dtype=np.float32,
                            shape=[geometry.output_shape[0], geometry.weight_shape[0], ho * wo])
        mask = self.s.constant(f"{name}.compact_mask", np.ones((ho, wo), dtype=bool))
        inputs = [compact.tensor, node.inputs[1],
                  _bias(node), mask, compact.index]
        self.s.detach(node)
        self.graph.nodes.append(gs.Node("PerforatedConv", name=name, domain=DOMAIN, attrs=attrs.to_onnx(),
                                        inputs=inputs, outputs=[dense]))
        shape = self.s.constant(f"{name}.shape", np.array([0, 0, ho, wo], dtype=np.int64))
        self.graph.nodes.append(gs.Node("Reshape", name=self.s.unique(f"{name}/reshape"), inputs=[dense, shape],
                                        outputs=[full]))
        self.stayed(name, compact, "implicit interpolation, all-ones mask")
        return None

    # -- reductions over space ---------------------------------------------------------------------

    def reduction(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        compact = inputs[0]
        op = node.op
        if self.compact_of(node.inputs[0]) is not compact:
            return Refusal(f"the compact tensor is not {op}'s data input", node.name)
        keepdims = True
        if op.startswith("Reduce"):
            keepdims = bool(node.attrs.get("keepdims", 1))
            axes = node.attrs.get("axes")
            if len(node.inputs) > 1 and node.inputs[1].name:
                axes = constant_value(node.inputs[1])
                if axes is None:
                    return Refusal(f"{op} has non-constant axes", node.name)
            if axes is None or sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) != [2, 3]:
                return Refusal(f"{op} does not reduce over exactly the two spatial axes", node.name)
        full = node.outputs[0]
        name = node_name(node)
        index = np.asarray(compact.index.values)
        batch, channels = compact.tensor.shape[0], compact.tensor.shape[1]
        reduced = gs.Variable(self.s.unique(f"{full.name}.compact"), dtype=np.float32, shape=[batch, channels, 1])
        if op in ("GlobalMaxPool", "ReduceMax"):
            # Interpolation only repeats computed values, so the max over the grid is the max over K.
            if self.s.opset >= 18:
                axes_input = self.s.constant(f"{name}.axes", np.array([2], dtype=np.int64))
                reducer = gs.Node("ReduceMax", name=self.s.unique(f"{name}/compact"), attrs={"keepdims": 1},
                                  inputs=[compact.tensor, axes_input], outputs=[reduced])
            else:
                reducer = gs.Node("ReduceMax", name=self.s.unique(f"{name}/compact"), attrs={"axes": [2], "keepdims": 1},
                                  inputs=[compact.tensor], outputs=[reduced])
        else:
            # Mean over the grid = sum_k x_k * (number of grid positions showing k) / (H * W).
            counts = np.bincount(index.reshape(-1), minlength=compact.k).astype(np.float64)
            if op != "ReduceSum":
                counts /= index.size
            weights = self.s.constant(f"{name}.compact_weights", counts.astype(np.float32).reshape(-1, 1))
            reducer = gs.Node("MatMul", name=self.s.unique(f"{name}/compact"), inputs=[compact.tensor, weights],
                              outputs=[reduced])
        target = [0, 0, 1, 1] if keepdims else [0, 0]
        shape = self.s.constant(f"{name}.shape", np.array(target, dtype=np.int64))
        self.s.detach(node)
        self.graph.nodes.append(reducer)
        self.graph.nodes.append(gs.Node("Reshape", name=name, inputs=[reduced, shape], outputs=[full]))
        self.stayed(name, compact, "max over K" if "Max" in op else "weighted MatMul")
        return None

    # -- pooling -----------------------------------------------------------------------------------

    def pool(self, node: gs.Node, inputs: list[Compact]) -> Refusal | None:
        """MaxPool / AveragePool -> CompactPool reading the compact tensor through its index."""
        compact = inputs[0]
        op, name = node.op, node_name(node)
        if not self.options.compact_pooling:
            return Refusal(f"{op} needs the full tensor (compact pooling is off)", node.name)
        if self.compact_of(node.inputs[0]) is not compact:
            return Refusal(f"the compact tensor is not {op}'s input", node.name)
        if extra_outputs_used(self.graph, node):
            return Refusal("MaxPool's Indices output is used", node.name)
        attrs = node.attrs
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
            return Refusal(f"{op} has auto_pad {attrs['auto_pad']!r}", node.name)
        kernel = list(attrs.get("kernel_shape", []))
        if len(kernel) != 2:
            return Refusal(f"{op} is not 2-D", node.name)
        pool_attrs = ops.compact_pool_attributes(op, attrs)
        if pool_attrs["mode"] == "average" and pool_attrs["dilations"] != [1, 1]:
            return Refusal("AveragePool with dilations", node.name)
        try:
            out_hw, windows = pool_windows(np.asarray(compact.index.values), pool_attrs)
        except ValueError as exc:
            return Refusal(str(exc), node.name)
        full = node.outputs[0]
        dims = self.full_dims(full.name)
        if dims is not None and tuple(dims[2:]) != out_hw:
            return Refusal(f"{op}'s output size {tuple(dims[2:])} is not the computed {out_hw}", node.name)
        positions, new_index, new_mask, how = self.pooled_positions(full, out_hw, windows)
        if positions is None:
            # A max window's key is its set of entries; an average window's is (divisor, entries, counts).
            entries = sum(len(w) if pool_attrs["mode"] == "max" else len(w[1]) for w in windows)
            window_reads = len(windows) * kernel[0] * kernel[1]
            plane = compact.index.values.size
            explicit = plane + self.options.pool_window_read_cost * window_reads
            channels = self.channels(compact)
            if channels and channels % nchwc_block() == 0:
                explicit += self.options.pool_reorder_cost * (plane - len(windows))
            if entries > explicit:
                return Refusal(f"{op}: CompactPool would read {entries} values per plane, more than NNInterpolate + "
                               f"{op} cost ({explicit:.0f})", node.name)
        pool_inputs = [compact.tensor, compact.index]
        self.s.detach(node)
        if positions is None:
            out = full  # the full pooled tensor, under its original name
            how = "CompactPool, full output"
        else:
            pool_inputs.append(self.s.constant(f"{name}.y_positions", positions.astype(np.int64)))
            index = self.canonical_index(self.s.constant(f"{name}.index", new_index))
            out = gs.Variable(self.s.unique(f"{full.name}.compact"), dtype=np.float32,
                              shape=[dims[0] if dims else None, self.channels(compact), len(positions)])
            self.state[full.name] = (full, Compact(out, index, new_mask, compact.layer, name))
        self.graph.nodes.append(gs.Node("CompactPool", name=name, domain=DOMAIN, attrs=pool_attrs, inputs=pool_inputs,
                                        outputs=[out]))
        self.stayed(name, compact, how)
        return None

    def pooled_positions(self, full: gs.Variable, out_hw, windows):
        """Which pooled positions to compute: (positions, index, mask, how); positions None = all."""
        readers = list(full.outputs)
        masks = []
        for reader in readers:
            if not (reader.op == "PerforatedConv" and reader.domain == DOMAIN and reader.inputs[0] is full
                    and len(reader.inputs) <= 4 and isinstance(reader.inputs[3], gs.Constant)
                    and list(reader.attrs.get("kernel_shape", [])) == [1, 1]
                    and list(reader.attrs.get("strides", [1, 1])) == [1, 1]
                    and not any(reader.attrs.get("pads", [0, 0, 0, 0]))):
                break
            masks.append(np.asarray(reader.inputs[3].values).astype(bool))
        else:
            if readers and full not in self.graph.outputs and all(
                    m.shape == tuple(out_hw) and np.array_equal(m, masks[0]) for m in masks):
                # Perforated 1x1 convolutions read only their computed positions: pool just those.
                mask = masks[0]
                return (np.flatnonzero(mask), ops.nearest_index(mask), mask,
                        "CompactPool at the positions its perforated 1x1 readers compute")
        # Equal windows (same entries, same weights) give equal outputs: compute one of each.
        groups, first = {}, []
        group_of = np.empty(len(windows), dtype=np.int64)
        for p, window in enumerate(windows):
            g = groups.setdefault(window, len(groups))
            if g == len(first):
                first.append(p)
            group_of[p] = g
        if len(first) > self.options.pooled_compact_fraction * len(windows):
            return None, None, None, ""
        mask = np.zeros(len(windows), dtype=bool)
        mask[first] = True
        return (np.array(first), group_of.reshape(out_hw), mask.reshape(out_hw),
                f"CompactPool, compact output: {len(first)} distinct windows of {len(windows)}")

    # -- interpolation where needed ----------------------------------------------------------------

    def materialise(self) -> None:
        """One NNInterpolate per compact tensor whose full name is still read (or is a graph output)."""
        for full, compact in self.state.values():
            if not (full.outputs or full in self.graph.outputs):
                continue  # nothing reads the full tensor: no interpolation
            if full in self.graph.outputs:
                compact.layer.interpolated_for[f"graph output {full.name!r}"] = "graph outputs keep their full shape"
            for node in full.outputs:
                compact.layer.interpolated_for.setdefault(node_name(node), f"{node.op} needs the full tensor")
            if full.inputs:
                continue  # still written by its seed NNInterpolate
            dims = self.full_dims(full.name)
            full.dtype = _element_type(compact.tensor)
            if dims is not None:
                full.shape = dims
            self.graph.nodes.append(gs.Node("NNInterpolate", name=self.s.unique(f"{compact.producer}/interpolate"),
                                            domain=DOMAIN, inputs=[compact.tensor, compact.index], outputs=[full]))


def pool_windows(index: np.ndarray, attrs: dict):
    """((Ho, Wo), [one hashable key per output position]): positions with equal keys read the same
    compact entries with the same weights, so they pool to the same value."""
    h, w = index.shape
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilations"]
    top, left, bottom, right = attrs["pads"]
    ceil_mode = attrs["ceil_mode"]
    ho = ops.pool_output_size(h, kh, sh, top, bottom, dh, ceil_mode)
    wo = ops.pool_output_size(w, kw, sw, left, right, dw, ceil_mode)
    if ho < 1 or wo < 1:
        raise ValueError(f"the pooling window does not fit the grid {(h, w)}")
    average = attrs["mode"] == "average"
    keys = []
    for i in range(ho):
        y0 = i * sh - top
        rows = [y0 + a * dh for a in range(kh) if 0 <= y0 + a * dh < h]
        for j in range(wo):
            x0 = j * sw - left
            cols = [x0 + b * dw for b in range(kw) if 0 <= x0 + b * dw < w]
            entries = index[np.ix_(rows, cols)].ravel()
            if not average:
                keys.append(frozenset(entries.tolist()))
                continue
            if attrs["count_include_pad"]:
                divisor = (min(y0 + kh, h + bottom) - y0) * (min(x0 + kw, w + right) - x0)
            else:
                divisor = entries.size
            values, counts = np.unique(entries, return_counts=True)
            keys.append((divisor, tuple(values.tolist()), tuple(counts.tolist())))
    return (ho, wo), keys


def _element_type(tensor: gs.Variable):
    """A compact tensor's element type: float32 unless it is 8-bit (PerforatedQLinearConv's output)."""
    return tensor.dtype if tensor.dtype is not None else np.float32


def _bias(conv: gs.Node):
    return conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else gs.Variable.empty()


# {op_type: handler} for the standard ops that can run on compact tensors, from the op table.
HANDLERS = {
    **{op: CompactPass.position_wise for kind in MOVABLE for op in ops_with(kind)},
    # Identity keeps the full tensor: removing it gains nothing, and it often names a graph output.
    "Dropout": CompactPass.dropout,
    **{op: CompactPass.concat for op in ops_with(Semantics.CHANNEL_CONCAT)},
    **{op: CompactPass.reduction for op in ops_with(Semantics.SPATIAL_REDUCTION)},
    "Conv": CompactPass.conv,
    **{op: CompactPass.pool for op in ops.POOL_MODES},
    "DequantizeLinear": CompactPass.quantize,
    "QuantizeLinear": CompactPass.quantize,
}
# The same for this package's own ops.
CUSTOM_HANDLERS = {"PerforatedConv": CompactPass.perforated_conv, "PerforatedQLinearConv": CompactPass.perforated_conv}
MASK_INPUT = {"PerforatedConv": 3, "PerforatedQLinearConv": 9}  # where each op's mask is; X_index follows it
# Readers of a dequantized tensor that ORT runs in 8 bits on the full tensor (QDQ fusion: QLinearConv,
# uint8 pooling, QLinearGlobalAveragePool); their float compact forms would be slower or round differently.
EIGHT_BIT_READERS = {"Conv", *ops.POOL_MODES, *ops_with(Semantics.SPATIAL_REDUCTION)}


def propagate(surgeon: Surgeon, shapes: dict, original: onnx.ModelProto, report, seeds,
              options: CompactOptions | None = None, *, fuse_activations: bool = True) -> None:
    """Run the compact pass on ``surgeon.graph``; ``seeds`` = [(LayerReport, NNInterpolate node, mask)]."""
    cp = CompactPass(surgeon, shapes, original, report, options or CompactOptions(), fuse_activations)
    for layer, interpolate, mask in seeds:
        cp.seed(layer, interpolate, mask)
    cp.run()


__all__ = ["CUSTOM_HANDLERS", "HANDLERS", "Compact", "CompactOptions", "CompactPass", "propagate"]
