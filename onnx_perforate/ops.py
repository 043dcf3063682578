"""The custom operators in code: node builders, the nearest-neighbour index, and the numpy
reference implementations (the test oracle), also registered for ``onnx.reference``.

docs/ops.md is the specification; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from onnx.reference.op_run import OpRun

from ._library import DOMAIN, OPSET_VERSION

ACTIVATIONS = ("", "Relu", "LeakyRelu", "Clip")
# PerforatedQLinearConv's: the monotone clamps, exact on the quantized value.
QUANTIZED_ACTIVATIONS = ("", "Relu", "Clip")
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class ConvAttributes:
    """PerforatedConv's attributes (ONNX Conv's, explicit pads, plus a fused activation)."""

    kernel_shape: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    activation: str = ""
    alpha: float = 0.01
    clip_min: float = -FLOAT32_MAX
    clip_max: float = FLOAT32_MAX

    def to_onnx(self) -> dict:
        attrs = dict(
            kernel_shape=list(self.kernel_shape),
            strides=list(self.strides),
            pads=list(self.pads),
            dilations=list(self.dilations),
            group=int(self.group),
        )
        if self.activation:
            attrs["activation"] = self.activation
            if self.activation == "LeakyRelu":
                attrs["alpha"] = float(self.alpha)
            if self.activation == "Clip":
                attrs["clip_min"] = float(self.clip_min)
                attrs["clip_max"] = float(self.clip_max)
        return attrs


def conv_output_size(in_hw, kernel_shape, strides, pads, dilations) -> tuple[int, int]:
    """Spatial output size of a 2-D convolution with explicit pads [top, left, bottom, right]."""
    out = []
    for axis in range(2):
        effective = (kernel_shape[axis] - 1) * dilations[axis] + 1
        padded = in_hw[axis] + pads[axis] + pads[axis + 2]
        out.append((padded - effective) // strides[axis] + 1)
    return out[0], out[1]


def nearest_index(mask: np.ndarray) -> np.ndarray:
    """NNInterpolate's index for a mask: int64 [Ho, Wo], values in [0, K).

    Each position maps to the computed position nearest in Euclidean (row, col) distance; ties go to
    the computed position with the smallest row-major index; computed positions map to themselves.

    Exact and O(Ho * Ho * Wo): for every row r, the nearest computed column of r (ties to the left) is
    found in 1-D; then for each output row the best row is the first argmin, which is the smallest
    row-major index among equally near candidates.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask has no computed position")
    ho, wo = mask.shape
    cols = np.arange(wo)
    big = np.iinfo(np.int64).max // 4
    # Nearest computed column left (<=) and right (>=) of each column, per row.
    left = np.where(mask, cols, -1)
    left = np.maximum.accumulate(left, axis=1)
    right = np.where(mask, cols, wo)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    d_left = np.where(left >= 0, cols - left, big)
    d_right = np.where(right < wo, right - cols, big)
    use_left = d_left <= d_right
    nearest_col = np.where(use_left, left, right)
    d_col = np.minimum(d_left, d_right)  # big where the row has no computed position
    rows = np.arange(ho)
    rank = np.cumsum(mask.ravel()) - 1  # flat position -> k
    index = np.empty((ho, wo), dtype=np.int64)
    d_col2 = np.where(d_col < big, d_col * d_col, big)
    for i in range(ho):
        dist = (rows[:, None] - i) ** 2 + d_col2  # [rows, wo]
        best_row = np.argmin(dist, axis=0)
        flat = best_row * wo + nearest_col[best_row, cols]
        index[i] = rank[flat]
    return index


def make_perforated_conv_node(inputs, output, attributes: ConvAttributes, name: str) -> onnx.NodeProto:
    """inputs = [X, W, B or "", mask] or [X, W, B or "", mask, X_index] (X compact, see docs/ops.md)."""
    return helper.make_node(
        "PerforatedConv", list(inputs), [output], name=name, domain=DOMAIN, **attributes.to_onnx()
    )


def make_perforated_qlinear_conv_node(inputs, output, attributes: ConvAttributes, name: str) -> onnx.NodeProto:
    """inputs = QLinearConv's [x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
    B or ""], then mask and optionally X_index (docs/ops.md)."""
    if attributes.activation not in QUANTIZED_ACTIVATIONS:
        raise ValueError(f"PerforatedQLinearConv {name!r}: activation {attributes.activation!r} cannot be fused "
                         "into a quantized convolution (expected '', 'Relu' or 'Clip')")
    return helper.make_node(
        "PerforatedQLinearConv", list(inputs), [output], name=name, domain=DOMAIN, **attributes.to_onnx()
    )


def make_nn_interpolate_node(compact, index, output, name: str) -> onnx.NodeProto:
    return helper.make_node("NNInterpolate", [compact, index], [output], name=name, domain=DOMAIN)


POOL_MODES = {"MaxPool": "max", "AveragePool": "average"}


def compact_pool_attributes(op_type: str, attrs) -> dict:
    """CompactPool's attributes for an ONNX MaxPool / AveragePool node's (a dict of its attributes)."""
    return dict(mode=POOL_MODES[op_type], kernel_shape=list(attrs.get("kernel_shape", [])),
                strides=list(attrs.get("strides", [1, 1])), pads=list(attrs.get("pads", [0, 0, 0, 0])),
                dilations=list(attrs.get("dilations", [1, 1])), ceil_mode=int(attrs.get("ceil_mode", 0)),
                count_include_pad=int(attrs.get("count_include_pad", 0)))


def make_compact_pool_node(inputs, output, name: str, **attributes) -> onnx.NodeProto:
    """inputs = [X, X_index] or [X, X_index, Y_positions]; attributes: mode, kernel_shape, strides,
    pads, dilations, ceil_mode, count_include_pad (docs/ops.md)."""
    return helper.make_node("CompactPool", list(inputs), [output], name=name, domain=DOMAIN, **attributes)


def opset_import() -> onnx.OperatorSetIdProto:
    return helper.make_opsetid(DOMAIN, OPSET_VERSION)


# ----------------------------------------------------------------------------------------------------
# Reference implementations (float64 accumulation, independent of the C++ code).


def _activate(y: np.ndarray, activation: str, alpha: float, clip_min: float, clip_max: float) -> np.ndarray:
    if activation in ("", None):
        return y
    if activation == "Relu":
        return np.maximum(y, 0)
    if activation == "LeakyRelu":
        return np.where(y < 0, alpha * y, y)
    if activation == "Clip":
        return np.clip(y, clip_min, clip_max)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def perforated_conv_reference(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    mask: np.ndarray,
    *,
    kernel_shape=None,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    group: int = 1,
    activation: str = "",
    alpha: float = 0.01,
    clip_min: float = -FLOAT32_MAX,
    clip_max: float = FLOAT32_MAX,
    x_index: np.ndarray | None = None,
    accumulate=np.float32,
) -> np.ndarray:
    """PerforatedConv in numpy: returns Yc [N, M, K] (float32, or ``accumulate``), computed in float64.

    With ``x_index``, ``x`` is compact [N, C, K_in] and stands for the interpolated input
    ``nn_interpolate_reference(x, x_index)``.
    """
    if x_index is not None:
        x = nn_interpolate_reference(x, x_index)
    x = np.asarray(x)
    w = np.asarray(w)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"X and W must be 4-D, got {x.shape} and {w.shape}")
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    if kernel_shape is not None and tuple(kernel_shape) != (kh, kw):
        raise ValueError(f"kernel_shape {tuple(kernel_shape)} does not match W {w.shape}")
    if c != cg * group or m % group:
        raise ValueError(f"channels do not match: X {x.shape}, W {w.shape}, group {group}")
    sh, sw = strides
    dh, dw = dilations
    ho, wo = conv_output_size((h, wd), (kh, kw), strides, pads, dilations)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (ho, wo):
        raise ValueError(f"mask shape {mask.shape} != output size {(ho, wo)}")
    ys, xs = np.nonzero(mask)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    mg = m // group
    out = np.zeros((n, m, len(ys)), dtype=np.float64)
    for g in range(group):
        xg = xp[:, g * cg : (g + 1) * cg]
        wg = w[g * mg : (g + 1) * mg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, ys * sh + i * dh, xs * sw + j * dw]  # [N, cg, K]
                out[:, g * mg : (g + 1) * mg] += np.einsum("oc,nck->nok", wg[:, :, i, j], patch)
    if b is not None:
        out += np.asarray(b, dtype=np.float64)[None, :, None]
    return _activate(out, activation, alpha, clip_min, clip_max).astype(accumulate)


def requantize(acc: np.ndarray, scale: np.ndarray, zero_point: int, out_min: int = 0, out_max: int = 255,
               dtype=np.uint8) -> np.ndarray:
    """int32 sums -> uint8 (or ``dtype``) as ORT's MLAS does on x86: ``float32(acc) * scale`` (float32),
    clamped to ``[out_min, out_max] - zero_point``, rounded to nearest even, plus ``zero_point``."""
    v = acc.astype(np.float32) * np.asarray(scale, np.float32)
    v = np.clip(v, np.float32(out_min - zero_point), np.float32(out_max - zero_point))
    return (np.rint(v).astype(np.int32) + zero_point).astype(dtype)


def _per_axis_shape(parameter: np.ndarray, axis: int, rank: int) -> tuple:
    """The shape that broadcasts a QuantizeLinear/DequantizeLinear scale or zero point (one value, or
    one per index of ``axis``) against a rank-``rank`` tensor."""
    if parameter.size == 1:
        return ()
    shape = [1] * rank
    shape[axis % rank] = parameter.size
    return tuple(shape)


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1,
                    output_dtype: int = 0) -> np.ndarray:
    """ONNX QuantizeLinear (per tensor or per axis): ``saturate(round_half_to_even(x / scale) + zero_point)``,
    the division in float32 as ORT computes it. The result has the zero point's type, else the
    ``output_dtype`` attribute's (an ONNX type code; opset 21), else uint8."""
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    if zero_point is not None:
        dtype = np.asarray(zero_point).dtype
    else:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else np.uint8)
    zero = np.zeros((), np.float64) if zero_point is None else np.asarray(zero_point, np.float64)
    if dtype.kind not in "iu":
        raise ValueError(f"QuantizeLinear to {dtype} is not supported (integer types only)")
    info = np.iinfo(dtype)
    if scale.size > 1 and (scale.ndim != 1 or x.ndim == 0 or scale.size != x.shape[axis % x.ndim]):
        raise ValueError(f"scale of shape {list(scale.shape)} is neither a scalar nor one value per index of axis "
                         f"{axis} of a tensor of shape {list(x.shape)}")
    rounded = np.rint(x / scale.reshape(_per_axis_shape(scale, axis, x.ndim))).astype(np.float64)
    zero = zero.reshape(_per_axis_shape(zero, axis, x.ndim))
    return np.clip(rounded + zero, info.min, info.max).astype(dtype)


def dequantize_linear(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None,
                      axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear (per tensor or per axis): ``(q - zero_point) * scale`` in float32."""
    q = np.asarray(q)
    scale = np.asarray(scale, np.float32)
    zero = np.zeros((), np.int64) if zero_point is None else np.asarray(zero_point, np.int64)
    centred = q.astype(np.int64) - zero.reshape(_per_axis_shape(zero, axis, q.ndim))
    return centred.astype(np.float32) * scale.reshape(_per_axis_shape(scale, axis, q.ndim))


def quantized_activation_bounds(activation: str, y_scale: float, y_zero_point: int, clip_min: float = -FLOAT32_MAX,
                                clip_max: float = FLOAT32_MAX, dtype=np.uint8) -> tuple[int, int]:
    """The range of PerforatedQLinearConv's output (uint8 or int8) after its fused activation (docs/ops.md)."""
    low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)

    def quantize(v):
        return int(min(float(high), max(float(low), np.rint(float(v) / float(y_scale)) + y_zero_point)))

    if activation in ("", None):
        return low, high
    if activation == "Relu":
        return int(y_zero_point), high
    if activation == "Clip":
        return quantize(clip_min), quantize(clip_max)
    raise ValueError(f"activation {activation!r} is not supported by PerforatedQLinearConv; expected '', 'Relu' or 'Clip'")


def perforated_qlinear_conv_reference(
    x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, b, mask, *,
    kernel_shape=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1,
    activation: str = "", clip_min: float = -FLOAT32_MAX, clip_max: float = FLOAT32_MAX,
    x_index: np.ndarray | None = None, **unused,
) -> np.ndarray:
    """PerforatedQLinearConv in numpy: uint8 (or int8) X, int8 W -> Yc [N, M, K] of X's type.

    The integer sums are exact (int64); requantization is :func:`requantize` with the per-channel scale
    ``float32(x_scale * w_scale[m]) / y_scale`` computed in float32, ORT's order."""
    if x_index is not None:
        x = nn_interpolate_reference(x, x_index)
    x = np.asarray(x)
    if x.ndim == 3:  # [N, C, K] without X_index: one row of K pixels (a compact tensor, all-ones [1, K] mask)
        x = x[:, :, None, :]
    w = np.asarray(w)
    if x.dtype not in (np.uint8, np.int8) or w.dtype != np.int8:
        raise ValueError(f"X must be uint8 or int8 and W int8, got {x.dtype} and {w.dtype}")
    m = w.shape[0]
    w_zero = np.broadcast_to(np.asarray(w_zero_point, np.int64).reshape(-1), (m,))
    x_zero = int(np.asarray(x_zero_point).reshape(()))
    y_zero = int(np.asarray(y_zero_point).reshape(()))
    centred = x.astype(np.float64) - x_zero  # exact: integers below 2^53
    centred_w = w.astype(np.float64) - w_zero.reshape(-1, 1, 1, 1)
    acc = perforated_conv_reference(
        centred, centred_w, None, mask, kernel_shape=kernel_shape, strides=strides, pads=pads,
        dilations=dilations, group=group, accumulate=np.float64,
    )
    acc = np.rint(acc).astype(np.int64)
    if b is not None:
        acc += np.asarray(b, np.int64)[None, :, None]
    w_scales = np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (m,))
    scale = (np.float32(np.asarray(x_scale).reshape(())) * w_scales) / np.float32(np.asarray(y_scale).reshape(()))
    lo, hi = quantized_activation_bounds(activation, float(np.asarray(y_scale).reshape(())), y_zero, clip_min, clip_max,
                                         x.dtype)
    return requantize(acc.astype(np.int32), scale.astype(np.float32)[None, :, None], y_zero, lo, hi, x.dtype)


def nn_interpolate_reference(yc: np.ndarray, index: np.ndarray) -> np.ndarray:
    """NNInterpolate in numpy: Y[n, m, i, j] = Yc[n, m, index[i, j]]."""
    yc = np.asarray(yc)
    index = np.asarray(index)
    if yc.ndim != 3 or index.ndim != 2:
        raise ValueError(f"Yc must be 3-D and index 2-D, got {yc.shape} and {index.shape}")
    if index.size and (index.min() < 0 or index.max() >= yc.shape[2]):
        raise ValueError(f"index values must lie in [0, {yc.shape[2]})")
    return yc[:, :, index]


def pool_output_size(in_size, kernel, stride, pad_begin, pad_end, dilation, ceil_mode) -> int:
    """ONNX pooling output size along one axis; with ceil_mode a last window must start inside the
    input or its leading padding."""
    span = in_size + pad_begin + pad_end - ((kernel - 1) * dilation + 1)
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= in_size + pad_begin:
        out -= 1
    return out


def compact_pool_reference(
    x: np.ndarray,
    x_index: np.ndarray,
    y_positions: np.ndarray | None = None,
    *,
    mode: str,
    kernel_shape,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    ceil_mode: int = 0,
    count_include_pad: int = 0,
) -> np.ndarray:
    """CompactPool in numpy: MaxPool / AveragePool of ``nn_interpolate_reference(x, x_index)``
    ([N, C, Ho, Wo]); with ``y_positions``, only those row-major output positions ([N, C, K_out]).
    float32, or uint8 / int8 for max pooling (the result keeps X's type)."""
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in ("max", "average"):
        raise ValueError(f"mode {mode!r}: expected 'max' or 'average'")
    dtype = np.asarray(x).dtype if np.asarray(x).dtype in (np.uint8, np.int8) else np.float32
    if mode == "average" and dtype != np.float32:
        raise ValueError("average pooling of an 8-bit X is not supported; expected mode 'max'")
    full = nn_interpolate_reference(x, x_index).astype(np.float64)
    n, c, h, w = full.shape
    kh, kw = kernel_shape
    sh, sw = strides
    dh, dw = dilations
    if mode == "average" and (dh, dw) != (1, 1):
        raise ValueError("average pooling takes no dilations")
    ho = pool_output_size(h, kh, sh, pads[0], pads[2], dh, ceil_mode)
    wo = pool_output_size(w, kw, sw, pads[1], pads[3], dw, ceil_mode)
    if ho < 1 or wo < 1:
        raise ValueError(f"the pooling window does not fit the input grid {(h, w)}")
    out = np.empty((n, c, ho, wo), dtype=np.float64)
    for i in range(ho):
        y0 = i * sh - pads[0]
        rows = [y0 + a * dh for a in range(kh) if 0 <= y0 + a * dh < h]
        for j in range(wo):
            x0 = j * sw - pads[1]
            cols = [x0 + b * dw for b in range(kw) if 0 <= x0 + b * dw < w]
            if not rows or not cols:
                raise ValueError(f"the pooling window of output ({i}, {j}) covers only padding")
            window = full[:, :, rows][:, :, :, cols]
            if mode == "max":
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                if count_include_pad:
                    divisor = (min(y0 + kh, h + pads[2]) - y0) * (min(x0 + kw, w + pads[3]) - x0)
                else:
                    divisor = len(rows) * len(cols)
                out[:, :, i, j] = window.sum(axis=(2, 3)) / divisor
    if y_positions is not None:
        y_positions = np.asarray(y_positions).reshape(-1)
        if y_positions.size and (y_positions.min() < 0 or y_positions.max() >= ho * wo):
            raise ValueError(f"Y_positions values must lie in [0, {ho * wo})")
        return out.reshape(n, c, ho * wo)[:, :, y_positions].astype(dtype)
    return out.astype(dtype)


class PerforatedConv(OpRun):
    """``onnx.reference`` implementation of onnx_perforate.PerforatedConv."""

    op_domain = DOMAIN

    def _run(self, x, w, b=None, mask=None, x_index=None, **attributes):
        attrs = {k: getattr(self, k, None) for k in _REFERENCE_ATTRS}
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if isinstance(attrs.get("activation"), bytes):
            attrs["activation"] = attrs["activation"].decode()
        return (perforated_conv_reference(x, w, b, mask, x_index=x_index, **attrs),)


_REFERENCE_ATTRS = (
    "kernel_shape",
    "strides",
    "pads",
    "dilations",
    "group",
    "activation",
    "alpha",
    "clip_min",
    "clip_max",
)


class PerforatedQLinearConv(OpRun):
    """``onnx.reference`` implementation of onnx_perforate.PerforatedQLinearConv."""

    op_domain = DOMAIN

    def _run(self, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, b=None, mask=None,
             x_index=None, **attributes):
        attrs = {k: getattr(self, k, None) for k in _REFERENCE_ATTRS}
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if isinstance(attrs.get("activation"), bytes):
            attrs["activation"] = attrs["activation"].decode()
        return (perforated_qlinear_conv_reference(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
                                                  y_zero_point, b, mask, x_index=x_index, **attrs),)


class NNInterpolate(OpRun):
    """``onnx.reference`` implementation of onnx_perforate.NNInterpolate."""

    op_domain = DOMAIN

    def _run(self, yc, index):
        return (nn_interpolate_reference(yc, index),)


class BatchNormalization(OpRun):
    """Inference-mode BatchNormalization for every opset.

    onnx.reference (1.23) runs opsets 9-13 in training mode (it applies the default momentum), which
    is wrong for the inference models this package rewrites (and for the rewritten BN that runs on
    compact [N, C, K] tensors)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, **attributes):
        epsilon = getattr(self, "epsilon", None)
        epsilon = 1e-5 if epsilon is None else epsilon
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale64 = np.asarray(scale, np.float64).reshape(shape) / np.sqrt(np.asarray(var, np.float64).reshape(shape) + epsilon)
        y = (x - np.asarray(mean, np.float64).reshape(shape)) * scale64 + np.asarray(bias, np.float64).reshape(shape)
        return (y.astype(x.dtype),)


class CompactPool(OpRun):
    """``onnx.reference`` implementation of onnx_perforate.CompactPool."""

    op_domain = DOMAIN

    def _run(self, x, x_index, y_positions=None, **attributes):
        attrs = {k: getattr(self, k, None) for k in POOL_ATTRIBUTES}
        return (compact_pool_reference(x, x_index, y_positions, **{k: v for k, v in attrs.items() if v is not None}),)


POOL_ATTRIBUTES = ("mode", "kernel_shape", "strides", "pads", "dilations", "ceil_mode", "count_include_pad")


class _CoercedTo2D(OpRun):
    """Softmax, LogSoftmax and Hardmax with the semantics of their opset (1-11 coerce the input to 2-D
    at ``axis``, default 1, and normalise over everything after it; 13 normalises along ``axis``,
    default -1). onnx.reference (1.23) always applies opset 13's, which gives wrong answers on older
    models, e.g. SqueezeNet 1.1's opset-7 softmax over [1, 1000, 1, 1]."""

    op_domain = ""

    def _run(self, x, **attributes):
        opset = self.run_params.get("opsets", {}).get("", 13)
        # The node's own attribute: OpRun fills in the default of the latest schema (-1).
        axis = next((a.i for a in self.onnx_node.attribute if a.name == "axis"), None)
        if opset >= 13:
            return (self._normalise(x, -1 if axis is None else axis).astype(x.dtype),)
        axis = 1 if axis is None else axis
        axis = axis + x.ndim if axis < 0 else axis
        flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        return (self._normalise(flat, 1).reshape(x.shape).astype(x.dtype),)


class Softmax(_CoercedTo2D):
    @staticmethod
    def _normalise(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)


class LogSoftmax(_CoercedTo2D):
    @staticmethod
    def _normalise(x, axis):
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class Hardmax(_CoercedTo2D):
    @staticmethod
    def _normalise(x, axis):
        hot = np.zeros_like(x)
        np.put_along_axis(hot, np.expand_dims(x.argmax(axis=axis), axis), 1, axis=axis)
        return hot


REFERENCE_OPS = [
    PerforatedConv, PerforatedQLinearConv, NNInterpolate, CompactPool, BatchNormalization, Softmax, LogSoftmax, Hardmax,
]


def reference_evaluator(model, **kwargs):
    """An ``onnx.reference.ReferenceEvaluator`` that knows the custom ops."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS, **kwargs)
