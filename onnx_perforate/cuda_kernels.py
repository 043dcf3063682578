"""ctypes binding of the CUDA kernels' C entry points (``custom_ops/cuda/kernels.h``).

For the GPU tests and benchmark, which drive the kernels on PyTorch CUDA tensors without ONNX Runtime
(a GPU machine may have only the CPU build of onnxruntime). Device pointers and the stream are passed
as integers (``tensor.data_ptr()``, ``torch.cuda.current_stream().cuda_stream``).
"""

from __future__ import annotations

import ctypes

import numpy as np

from ._library import LibraryNotFoundError, check_shared_library, cuda_kernels_library_path

ACTIVATIONS = {"": 0, "Relu": 1, "LeakyRelu": 2, "Clip": 3}  # custom_ops/shared/conv_geometry.h order
# ONNX_PERFORATE_CUDA_CONV_* of kernels.h: the kernel a PerforatedConv launch uses.
CONV_KERNELS = {0: "nothing", 1: "bias only", 2: "direct", 3: "small tiles", 4: "big tiles"}


def load(path: str | None = None) -> ctypes.CDLL:
    """The kernels library (``cuda_kernels_library_path()`` unless ``path``) with its signatures declared."""
    path = path or cuda_kernels_library_path()
    if path is None:
        raise LibraryNotFoundError("libonnx_perforate_cuda_kernels.so is not built (build with ONNX_PERFORATE_CUDA=ON, "
                                   "or set ONNX_PERFORATE_CUDA_KERNELS)")
    check_shared_library(path)  # a truncated copy would kill the process (SIGBUS) inside dlopen
    lib = ctypes.CDLL(str(path))
    i32, i64, f32, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.onnx_perforate_cuda_perforated_conv.argtypes = [vp, vp, vp, vp] + [i32] * 10 + [f32, f32, f32, vp, vp]
    lib.onnx_perforate_cuda_perforated_conv.restype = i32
    lib.onnx_perforate_cuda_nn_interpolate.argtypes = [vp, vp, i64, i32, i32, vp, vp]
    lib.onnx_perforate_cuda_nn_interpolate.restype = i32
    lib.onnx_perforate_cuda_error_string.argtypes = [i32]
    lib.onnx_perforate_cuda_error_string.restype = ctypes.c_char_p
    lib.onnx_perforate_build_gather_table.argtypes = (
        [i64] * 12 + [vp, i64, i64, vp, ctypes.POINTER(i64), ctypes.c_char_p, ctypes.c_size_t])
    lib.onnx_perforate_build_gather_table.restype = i32
    lib.onnx_perforate_cuda_conv_launch.argtypes = [i32] * 10 + [ctypes.POINTER(i32)]
    lib.onnx_perforate_cuda_conv_launch.restype = i32
    lib.onnx_perforate_cuda_device_conv_config.argtypes = [ctypes.POINTER(i32), ctypes.POINTER(i32)]
    lib.onnx_perforate_cuda_device_conv_config.restype = i32
    _declare_pool(lib)
    return lib


def conv_launch(lib: ctypes.CDLL, n, c, m, group, kh, kw, count, sms, big_blocks_per_sm,
                deterministic=False) -> tuple[str, int]:
    """(kernel, reduction splits) that a PerforatedConv launch picks on a device with `sms`
    multiprocessors holding `big_blocks_per_sm` big-tile blocks each (host code: no GPU needed)."""
    splits = ctypes.c_int(0)
    kind = lib.onnx_perforate_cuda_conv_launch(n, c, m, group, kh, kw, count, sms, big_blocks_per_sm,
                                               int(deterministic), ctypes.byref(splits))
    if kind < 0:
        raise ValueError(f"invalid convolution for a launch: N={n} C={c} M={m} group={group} kernel={kh}x{kw} K={count}")
    return CONV_KERNELS[kind], splits.value


def device_conv_config(lib: ctypes.CDLL) -> tuple[int, int]:
    """(multiprocessors, big-tile blocks per multiprocessor) of the current CUDA device."""
    sms, per_sm = ctypes.c_int(0), ctypes.c_int(0)
    status = lib.onnx_perforate_cuda_device_conv_config(ctypes.byref(sms), ctypes.byref(per_sm))
    if status:
        raise RuntimeError(f"no usable CUDA device: {lib.onnx_perforate_cuda_error_string(status).decode()}")
    return sms.value, per_sm.value


def gather_table(lib: ctypes.CDLL, h, w, kh, kw, stride, pads, dilation, mask: np.ndarray) -> np.ndarray:
    """The [kh*kw, K] int32 gather table, built by the library's shared geometry code; raises
    ValueError with the library's message for bad geometry."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    offsets = np.empty(kh * kw * mask.size, dtype=np.int32)
    count = ctypes.c_int64(0)
    error = ctypes.create_string_buffer(512)
    status = lib.onnx_perforate_build_gather_table(
        h, w, kh, kw, stride[0], stride[1], *pads, dilation[0], dilation[1], mask.ctypes.data, mask.shape[0],
        mask.shape[1], offsets.ctypes.data, ctypes.byref(count), error, len(error))
    if status:
        raise ValueError(error.value.decode())
    return offsets[: kh * kw * count.value].reshape(kh * kw, count.value)


POOL_MODES = {"max": 0, "average": 1}  # custom_ops/cuda/pool_kernels.h


def _declare_pool(lib: ctypes.CDLL) -> None:
    i32, i64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.onnx_perforate_cuda_compact_pool.argtypes = [vp, vp, vp, vp, i32, i64, i32, i32, vp, vp]
    lib.onnx_perforate_cuda_compact_pool.restype = i32
    p64 = ctypes.POINTER(i64)
    lib.onnx_perforate_build_pool_table.argtypes = (
        [i32, i64, i64, i64, i64, vp, i64, i64, i32, i32, vp, i64, i64, i64, vp, i64, vp, vp, vp]
        + [p64] * 4 + [ctypes.c_char_p, ctypes.c_size_t])
    lib.onnx_perforate_build_pool_table.restype = i32


def pool_table(lib: ctypes.CDLL, x_index: np.ndarray, k_in: int, attrs: dict, y_positions=None):
    """CompactPool's window table (begin int32 [count + 1], entries int32, weights float32 or None,
    (Ho, Wo)), built by the library's shared geometry code; ``attrs`` as CompactPool's attributes.
    Raises ValueError with the library's message for bad geometry."""
    index = np.ascontiguousarray(x_index, dtype=np.int64)
    pads = np.asarray(attrs.get("pads", [0, 0, 0, 0]), dtype=np.int64)
    positions = None if y_positions is None else np.ascontiguousarray(y_positions, dtype=np.int64)
    kh, kw = attrs["kernel_shape"]
    stride = attrs.get("strides", [1, 1])
    dilation = attrs.get("dilations", [1, 1])
    mode = POOL_MODES[attrs["mode"]]
    sizes = [ctypes.c_int64(0) for _ in range(4)]
    error = ctypes.create_string_buffer(512)

    def call(begin=None, entries=None, weights=None):
        status = lib.onnx_perforate_build_pool_table(
            mode, kh, kw, stride[0], stride[1], pads.ctypes.data, dilation[0], dilation[1],
            int(attrs.get("ceil_mode", 0)), int(attrs.get("count_include_pad", 0)), index.ctypes.data,
            index.shape[0], index.shape[1], k_in, None if positions is None else positions.ctypes.data,
            0 if positions is None else positions.size,
            None if begin is None else begin.ctypes.data, None if entries is None else entries.ctypes.data,
            None if weights is None else weights.ctypes.data, *[ctypes.byref(v) for v in sizes], error, len(error))
        if status:
            raise ValueError(error.value.decode())

    call()
    count, entry_count, out_h, out_w = (v.value for v in sizes)
    begin = np.empty(count + 1, np.int32)
    entries = np.empty(entry_count, np.int32)
    weights = np.empty(entry_count, np.float32) if mode == POOL_MODES["average"] else None
    call(begin, entries, weights)
    return begin, entries, weights, (out_h, out_w)
