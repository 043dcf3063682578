"""Small graph helpers shared by the rewriter, the masks and ``inspect``: loading and atomic saving,
static shapes from ONNX shape inference, constant lookup and 2-D Conv geometry."""

from __future__ import annotations

import logging
import math
import os
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
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
    """A private copy of ``model`` (a ModelProto, or a path whose file must hold a model that passes
    the ONNX checker; external data is loaded)."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if not isinstance(model, (str, os.PathLike)):
        raise PerforateError(f"expected an onnx.ModelProto or a path to an ONNX file, got {type(model).__name__}")
    path = Path(model)
    if path.is_dir():
        raise PerforateError(f"{str(path)!r} is a directory, expected an ONNX model file")
    if not path.exists():
        raise PerforateError(f"model file {str(path)!r} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise PerforateError(f"model file {str(path)!r} is empty")
    try:
        loaded = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf/onnx raise various types for a corrupt file
        raise PerforateError(f"cannot read ONNX model {str(path)!r}: {exc}") from exc
    missing = sorted({entry.value for t in _external_tensors(loaded) for entry in t.external_data
                      if entry.key == "location" and not (path.parent / entry.value).is_file()})
    if missing:
        raise PerforateError(f"ONNX model {str(path)!r} keeps its weights in external data file(s) {missing}, "
                             f"which are not beside it in {str(path.parent)!r}")
    check_model(loaded, f"model file {str(path)!r}")
    try:
        onnx.load_external_data_for_model(loaded, str(path.parent))
    except Exception as exc:
        raise PerforateError(f"cannot read the external data of ONNX model {str(path)!r}: {exc}") from exc
    return loaded


def _external_tensors(model: onnx.ModelProto):
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def check_model(model: onnx.ModelProto, source: str = "the input model") -> None:
    """Raise a package error when ``model`` fails the ONNX checker (a corrupt or truncated file, an
    empty one, or a model that was never valid), before anything else trips over it."""
    light = light_copy(model)
    # The checker wants a shape on every declared tensor type; ONNX Runtime runs models without them.
    for value in list(light.graph.input) + list(light.graph.output) + list(light.graph.value_info):
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(light)
    except Exception as exc:
        raise PerforateError(f"{source} is not a valid ONNX model (the ONNX checker says: {exc})") from exc
    broken = _first_non_utf8_name(model)
    if broken:
        raise PerforateError(f"{source} is not a valid ONNX model: {broken} is not UTF-8 text (a corrupt file?)")


def _first_non_utf8_name(model: onnx.ModelProto) -> str | None:
    """Where the model holds a name that is not UTF-8 (protobuf hands such strings over as bytes)."""
    graph = model.graph
    for index, node in enumerate(graph.node):
        for field in ("name", "op_type", "domain"):
            if isinstance(getattr(node, field), bytes):
                return f"the {field} of node {index} ({getattr(node, field)!r})"
        for name in list(node.input) + list(node.output):
            if isinstance(name, bytes):
                return f"tensor name {name!r} of node {index}"
    for value in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        if isinstance(value.name, bytes):
            return f"tensor name {value.name!r}"
    return None


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (initializers dominate; counted without serializing)."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    return size + sum(n.ByteSize() for n in model.graph.node)


def output_path(path: str | os.PathLike) -> Path:
    """Where writing ``path`` lands: a symbolic link is followed (the file it points to is replaced, as
    coreutils do); anything existing there that is not a regular file (a device, a FIFO, a socket, a
    directory) is refused, so that an output never replaces it."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        mode = path.stat().st_mode
        kind = ("a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise PerforateError(f"refusing to write {str(path)!r}: it is {kind}, and outputs only ever replace regular files")
    return path


def check_outputs(outputs: dict, inputs: dict | None = None) -> None:
    """Before any work, refuse outputs that would fail or destroy something: ``outputs`` and ``inputs``
    map a label (``"--output"``, ``"the input model"``) to a path (None: not given). An output must not
    be an input (writing it would destroy the input), nor another output, nor something that is not a
    regular file (:func:`output_path`), and must lie in a folder that exists or can be made."""
    given = {}
    for label, path in outputs.items():
        if path is not None:
            try:
                given[label] = output_path(path)
            except PerforateError as exc:
                raise PerforateError(f"{label}: {exc}") from None
    seen: dict[Path, str] = {}
    for label, final in given.items():
        if final in seen:
            raise PerforateError(f"{label} and {seen[final]} are the same file {str(final)!r}; "
                                 "give each output its own path")
        seen[final] = label
        for input_label, source in (inputs or {}).items():
            if source is not None and _same_file(final, Path(source)):
                raise PerforateError(f"refusing to write {label} {str(final)!r}: it is {input_label} "
                                     f"{str(source)!r}, which writing would destroy; choose another path")
        folder = final.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise PerforateError(f"cannot write {label} {str(final)!r}: {str(folder)!r} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PerforateError(f"cannot write {label} {str(final)!r}: folder {str(folder)!r} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def _new_file_mode(final: Path) -> int:
    """The mode a new file gets from open(2) and the umask, or the mode of the file it replaces."""
    try:
        return stat.S_IMODE(final.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM received during the block act when it ends (Python handles signals in the main
    thread only; other threads run the block as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        for number in received[:1]:
            signal.raise_signal(number)  # now handled as it would have been


@contextmanager
def atomic_outputs(*paths: str | os.PathLike):
    """Write several files all or none: yields temporary paths beside ``paths`` (see :func:`output_path`);
    when the block succeeds they are renamed over the final ones, with the mode a plain ``open`` would
    give them; when it fails they are removed and the final paths are untouched."""
    finals = [output_path(p) for p in paths]
    if len(set(finals)) != len(finals):
        raise PerforateError(f"two outputs are the same file: {[str(p) for p in paths]}")
    temporaries: list[Path] = []
    try:
        for final in finals:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
            except OSError as exc:  # the message would name the temporary file, not the output
                raise PerforateError(f"cannot write {str(final)!r}: {exc.strerror or exc}") from exc
            os.close(fd)
            temporaries.append(Path(name))
        yield temporaries
        with _signals_deferred():  # a Ctrl-C between two renames would leave one output without the other
            for temporary, final in zip(temporaries, finals):
                os.chmod(temporary, _new_file_mode(final))
            for temporary, final in zip(temporaries, finals):
                os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               json_files: dict | None = None) -> None:
    """Write ``model`` to ``path`` through a temporary file and a rename, so a failure never leaves a
    half-written file. ``external_data=None`` stores weights externally (``<name>.data`` beside the
    model) only when the model would exceed protobuf's 2 GB limit. ``json_files`` ({path: data}) are
    written with it, all or none."""
    if external_data is None:
        external_data = model_size(model) >= _TWO_GB - (64 << 20)
    json_files = dict(json_files or {})
    final = output_path(path)
    outputs = [final] + ([final.parent / f"{final.name}.data"] if external_data else []) + list(json_files)
    with atomic_outputs(*outputs) as temporaries:
        model_tmp = temporaries[0]
        if external_data:
            # onnx writes external data next to the model under the given relative name: write it
            # under the temporary name and point the model at the final one before the renames.
            data_tmp = temporaries[1]
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            # onnx refuses a location that exists, looking for it in the working directory (as it is when
            # writing beside the working directory): the temporary name is free again until onnx writes it
            data_tmp.unlink()
            onnx.external_data_helper.convert_model_to_external_data(
                copy, all_tensors_to_one_file=True, location=data_tmp.name, size_threshold=1024
            )
            onnx.save_model(copy, str(model_tmp))
            data_tmp.touch()  # no tensor above the threshold: an empty data file, so that both outputs exist
            _relocate_external_data(str(model_tmp), data_tmp.name, outputs[1].name)
        else:
            onnx.save_model(model, str(model_tmp))
        for temporary, data in zip(temporaries[len(outputs) - len(json_files):], json_files.values()):
            _dump_json(data, temporary)


def _relocate_external_data(model_path: str, old: str, new: str) -> None:
    model = onnx.load(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(model, model_path)


def _dump_json(data, path: Path) -> None:
    import json

    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_json(data, path: str | os.PathLike) -> None:
    """Write JSON through a temporary file and a rename (see :func:`atomic_outputs`)."""
    with atomic_outputs(path) as (temporary,):
        _dump_json(data, temporary)


# ----------------------------------------------------------------------------------------------------
# Shapes and constants


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports (the highest, should "" and "ai.onnx"
    both be listed; 1 when neither is)."""
    return max([entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")] or [1])


def graph_names(graph: onnx.GraphProto) -> set:
    """Every tensor and node name of ``graph`` (what a new name must not collide with)."""
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


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


def declared_shapes(model: onnx.ModelProto, *, symbolic: bool = True) -> dict[str, tuple[int, tuple | None]]:
    """``{tensor name: (elem_type, dims)}`` as the model declares them (inputs, value_info, outputs,
    initializers), without running inference. A dim is an int, a symbolic name (None with
    ``symbolic=False``) or None."""
    shapes: dict[str, tuple[int, tuple]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.elem_type:
            continue
        dims = None
        if t.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else ((d.dim_param or None) if symbolic else None)
                for d in t.shape.dim
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
    shapes = declared_shapes(inferred)
    if default_opset(model) < 11 and not _conv_shapes_known(model, shapes):
        try:
            converted = onnx.version_converter.convert_version(light, 13)
            more = declared_shapes(onnx.shape_inference.infer_shapes(converted, strict_mode=False, data_prop=True))
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


def producer_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """{tensor: the node of ``model``'s main graph that produces it}."""
    return {name: node for node in model.graph.node for name in node.output if name}


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
    if node.op_type == "ConvInteger":
        raise UnsupportedNodeError(
            f"node {key!r} is a ConvInteger: its int32 output cannot be perforated; quantize the model in "
            "QDQ format or with QLinearConv (onnxruntime.quantization.quantize_static)"
        )
    if node.op_type not in ("Conv", "QLinearConv") or node.domain not in ("", "ai.onnx"):
        raise UnsupportedNodeError(f"node {key!r} is a {node.op_type}, expected an ONNX Conv")
    quantized = node.op_type == "QLinearConv"
    weight = node.input[3 if quantized else 1]
    attrs = node_attributes(node)
    x_type, x_shape = shapes.get(node.input[0], (0, None))
    w_shape = shapes.get(weight, (0, None))[1]
    y_shape = shapes.get(node.output[0], (0, None))[1]
    rank = len(attrs["kernel_shape"]) + 2 if "kernel_shape" in attrs else None
    rank = rank or (len(w_shape) if w_shape else None) or (len(x_shape) if x_shape else None)
    if rank is None:
        raise DynamicShapeError(f"Conv {key!r}: the rank of input {node.input[0]!r} is unknown")
    if rank != 4:
        raise UnsupportedNodeError(
            f"Conv {key!r} is a {rank - 2}-D convolution (weight {weight!r} has rank {rank}); "
            "only 2-D convolutions can be perforated"
        )
    expected_types = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) if quantized else (onnx.TensorProto.FLOAT,)
    if x_type and x_type not in expected_types:
        raise UnsupportedNodeError(
            f"{node.op_type} {key!r}: input {node.input[0]!r} is {onnx.TensorProto.DataType.Name(x_type)}, "
            f"expected {' or '.join(onnx.TensorProto.DataType.Name(t) for t in expected_types)}"
        )
    if w_shape is None or any(not isinstance(d, int) for d in w_shape):
        raise DynamicShapeError(f"Conv {key!r}: the shape of weight {weight!r} is not static")
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
