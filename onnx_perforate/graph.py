"""Small graph helpers shared by the rewriter, the masks and ``inspect``: loading and atomic saving,
static shapes from ONNX shape inference, constant lookup and 2-D Conv geometry."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import DynamicShapeError, PerforateError, UnsupportedNodeError
from .ops import ConvAttributes, conv_output_size

log = logging.getLogger(__name__)

QUANTIZED_CONVS = ("ConvInteger", "QLinearConv")
_TWO_GB = 2**31
# Initializers larger than this are left out of the copy handed to shape inference (their shape is
# enough), which keeps >2 GB models under protobuf's limit and inference fast.
_LIGHT_LIMIT = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A private copy of ``model`` (a ModelProto or a path; external data is loaded)."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    path = Path(model)
    if not path.is_file():
        raise PerforateError(f"model file {str(path)!r} does not exist")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf/onnx raise various types for a corrupt file
        raise PerforateError(f"cannot read ONNX model {str(path)!r}: {exc}") from exc


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (initializers dominate; counted without serializing)."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    return size + sum(n.ByteSize() for n in model.graph.node)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` through a temporary file and a rename, so a failure never leaves a
    half-written file. ``external_data=None`` stores weights externally (``<name>.data`` beside the
    model) only when the model would exceed protobuf's 2 GB limit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_size(model) >= _TWO_GB - (64 << 20)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    tmp.close()
    data_name = f"{path.name}.data"
    tmp_data = path.parent / f".{data_name}.tmp"
    try:
        if external_data:
            # onnx writes external data next to the model under the given relative name: write it
            # under a temporary name and point the model at the final one before renaming both.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.external_data_helper.convert_model_to_external_data(
                copy, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024
            )
            onnx.save_model(copy, tmp.name)
            _relocate_external_data(tmp.name, tmp_data.name, data_name)
            os.replace(tmp_data, path.parent / data_name)
        else:
            onnx.save_model(model, tmp.name)
        os.replace(tmp.name, path)
    except BaseException:
        for leftover in (Path(tmp.name), tmp_data):
            leftover.unlink(missing_ok=True)
        raise


def _relocate_external_data(model_path: str, old: str, new: str) -> None:
    model = onnx.load(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(model, model_path)


def write_json(data, path: str | os.PathLike) -> None:
    """Write JSON through a temporary file and a rename."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------
# Shapes and constants


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def node_key(node) -> str:
    """How masks name a node: its name, or for unnamed nodes its first output."""
    return node.name or node.output[0]


def unique_name(base: str, taken: set) -> str:
    """``base``, else ``base_2``, ``base_3``...: the first name not in ``taken``, which is added to it."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without large initializer payloads: those become typed graph inputs."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs from IR 4
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for init in g.initializer:
        if len(init.raw_data) <= _LIGHT_LIMIT and not init.external_data:
            lg.initializer.add().CopyFrom(init)
        elif init.name not in declared:
            lg.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _collect(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    shapes: dict[str, tuple[int, tuple]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dims = None
        if t.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            )
        if vi.name not in shapes or shapes[vi.name][1] is None:
            shapes[vi.name] = (t.elem_type, dims)
    for init in g.initializer:
        shapes[init.name] = (init.data_type, tuple(init.dims))
    return shapes


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """``{tensor name: (elem_type, dims)}`` after ONNX shape inference; a dim is an int, a symbolic
    name or None. Old opsets whose Conv shapes stay unknown are converted (a copy, for the shapes only)."""
    light = light_copy(model)
    inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    shapes = _collect(inferred)
    if default_opset(model) < 11 and not _conv_shapes_known(model, shapes):
        try:
            converted = onnx.version_converter.convert_version(light, 13)
            more = _collect(onnx.shape_inference.infer_shapes(converted, strict_mode=False, data_prop=True))
            log.info("shapes taken from a copy converted to opset 13 (the model itself keeps its opset)")
            for name, value in more.items():
                if shapes.get(name, (0, None))[1] is None:
                    shapes[name] = value
        except Exception as exc:  # the converter lacks some adapters; keep what we have
            log.debug("version conversion for shape inference failed: %s", exc)
    return shapes


def _conv_shapes_known(model, shapes) -> bool:
    for node in model.graph.node:
        if node.op_type == "Conv" and shapes.get(node.output[0], (0, None))[1] is None:
            return False
    return True


def constant_node_value(attributes) -> np.ndarray | None:
    """The value of a Constant node from its attributes (AttributeProtos), or None (sparse)."""
    for attr in attributes:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return numpy_helper.to_array(value)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(value, dtype=np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.asarray(value, dtype=np.int64)
    return None


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                uses.setdefault(name, []).append(node)
    return uses


# ----------------------------------------------------------------------------------------------------
# Conv geometry


@dataclass
class ConvGeometry:
    """What the rewriter needs to know about one 2-D Conv."""

    node: onnx.NodeProto
    key: str
    input_shape: tuple
    weight_shape: tuple
    output_shape: tuple
    attributes: ConvAttributes

    @property
    def out_hw(self) -> tuple[int, int]:
        return int(self.output_shape[2]), int(self.output_shape[3])

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image."""
        m, cg, kh, kw = self.weight_shape
        ho, wo = self.out_hw
        return int(m * cg * kh * kw * ho * wo)


def find_node(model: onnx.ModelProto, key: str) -> onnx.NodeProto | None:
    """The node named ``key``, else the node whose first output is ``key``."""
    for node in model.graph.node:
        if node.name and node.name == key:
            return node
    for node in model.graph.node:
        if node.output and node.output[0] == key:
            return node
    return None


def node_attributes(node) -> dict:
    """A NodeProto's attributes as {name: Python value}."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def conv_geometry(node: onnx.NodeProto, shapes: dict) -> ConvGeometry:
    """Geometry of a 2-D Conv with explicit pads (``auto_pad`` resolved), or a package error that
    names the node and says what is missing."""
    key = node_key(node)
    if node.op_type in QUANTIZED_CONVS:
        raise UnsupportedNodeError(
            f"node {key!r} is a {node.op_type}: quantized convolutions cannot be perforated "
            "(PerforatedConv takes float32 Conv nodes)"
        )
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        raise UnsupportedNodeError(f"node {key!r} is a {node.op_type}, expected an ONNX Conv")
    attrs = node_attributes(node)
    x_type, x_shape = shapes.get(node.input[0], (0, None))
    w_shape = shapes.get(node.input[1], (0, None))[1]
    y_shape = shapes.get(node.output[0], (0, None))[1]
    rank = len(attrs["kernel_shape"]) + 2 if "kernel_shape" in attrs else None
    rank = rank or (len(w_shape) if w_shape else None) or (len(x_shape) if x_shape else None)
    if rank is None:
        raise DynamicShapeError(f"Conv {key!r}: the rank of input {node.input[0]!r} is unknown")
    if rank != 4:
        raise UnsupportedNodeError(
            f"Conv {key!r} is a {rank - 2}-D convolution (weight {node.input[1]!r} has rank {rank}); "
            "only 2-D convolutions can be perforated"
        )
    if x_type and x_type != onnx.TensorProto.FLOAT:
        raise UnsupportedNodeError(
            f"Conv {key!r}: input {node.input[0]!r} is {onnx.TensorProto.DataType.Name(x_type)}, expected FLOAT"
        )
    if w_shape is None or any(not isinstance(d, int) for d in w_shape):
        raise DynamicShapeError(f"Conv {key!r}: the shape of weight {node.input[1]!r} is not static")
    if x_shape is None or any(not isinstance(d, int) for d in x_shape[2:]):
        raise DynamicShapeError(
            f"Conv {key!r}: the spatial size of input {node.input[0]!r} is not static ({_fmt(x_shape)}); "
            "export the model with a fixed height and width"
        )
    kernel = tuple(attrs.get("kernel_shape", w_shape[2:]))
    strides = tuple(attrs.get("strides", (1, 1)))
    dilations = tuple(attrs.get("dilations", (1, 1)))
    pads = _resolve_pads(attrs, x_shape[2:], kernel, strides, dilations)
    geometry = ConvAttributes(kernel, strides, pads, dilations, int(attrs.get("group", 1)))
    ho, wo = conv_output_size(x_shape[2:], kernel, strides, pads, dilations)
    if ho <= 0 or wo <= 0:
        raise PerforateError(f"Conv {key!r}: computed output size {(ho, wo)} is empty")
    if y_shape is not None and all(isinstance(d, int) for d in y_shape[2:]) and tuple(y_shape[2:]) != (ho, wo):
        raise PerforateError(
            f"Conv {key!r}: output {node.output[0]!r} has spatial size {tuple(y_shape[2:])} "
            f"but the attributes give {(ho, wo)}"
        )
    out = (x_shape[0], w_shape[0], ho, wo)
    return ConvGeometry(node, key, tuple(x_shape), tuple(w_shape), out, geometry)


def _resolve_pads(attrs, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        # ONNX order is [x1_begin, x2_begin, x1_end, x2_end] = [top, left, bottom, right]
        return pads  # type: ignore[return-value]
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for axis in range(2):
        out = math.ceil(in_hw[axis] / strides[axis])
        effective = (kernel[axis] - 1) * dilations[axis] + 1
        total = max((out - 1) * strides[axis] + effective - in_hw[axis], 0)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the beginning.
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def _fmt(shape) -> str:
    if shape is None:
        return "unknown shape"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


format_shape = _fmt
