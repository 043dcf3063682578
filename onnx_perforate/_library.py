"""Locating the compiled custom-op library and building ORT session options that load it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

DOMAIN = "onnx_perforate"
OPSET_VERSION = 1
_LIBRARY_NAME = "libonnx_perforate_ops.so"
_CUDA_LIBRARY_NAME = "libonnx_perforate_ops_cuda.so"
_CUDA_KERNELS_NAME = "libonnx_perforate_cuda_kernels.so"


class LibraryNotFoundError(FileNotFoundError):
    """The compiled custom-op library is not installed (and ONNX_PERFORATE_LIBRARY is not set)."""


def _find(name: str, env: str) -> Path | None:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LibraryNotFoundError(f"{env}={override} does not name a file")
        return path
    path = Path(__file__).resolve().parent / "lib" / name
    return path if path.is_file() else None


def library_path() -> str:
    """Path of the CPU custom-op library (``ONNX_PERFORATE_LIBRARY`` overrides it)."""
    path = _find(_LIBRARY_NAME, "ONNX_PERFORATE_LIBRARY")
    if path is None:
        raise LibraryNotFoundError(
            f"{_LIBRARY_NAME} is not installed next to the package; build it with `pip install .` "
            "or point ONNX_PERFORATE_LIBRARY at a built copy"
        )
    return str(path)


def cuda_library_path() -> str | None:
    """Path of the library with CPU and CUDA kernels, or None when it was not built."""
    path = _find(_CUDA_LIBRARY_NAME, "ONNX_PERFORATE_CUDA_LIBRARY")
    return str(path) if path else None


def cuda_kernels_library_path() -> str | None:
    """Path of the CUDA kernels' C entry points (no ORT; for tests and benchmarks through ctypes):
    ``ONNX_PERFORATE_CUDA_KERNELS``, else the package's ``lib``, else next to the CUDA ops library."""
    path = _find(_CUDA_KERNELS_NAME, "ONNX_PERFORATE_CUDA_KERNELS")
    if path is None and cuda_library_path():
        beside = Path(cuda_library_path()).parent / _CUDA_KERNELS_NAME
        path = beside if beside.is_file() else None
    return str(path) if path else None


def has_library() -> bool:
    try:
        library_path()
        return True
    except LibraryNotFoundError:
        return False


def _point_at_openblas() -> None:
    """Tell the library where pip put OpenBLAS, for builds that do not sit in site-packages."""
    if os.environ.get("ONNX_PERFORATE_OPENBLAS"):
        return
    try:
        import scipy_openblas32
    except ImportError:  # the library reports the missing GEMM itself, naming the package
        return
    path = Path(scipy_openblas32.get_lib_dir()) / "libscipy_openblas.so"
    if path.is_file():
        os.environ["ONNX_PERFORATE_OPENBLAS"] = str(path)


def session_options(
    intra_op_num_threads: int | None = None,
    *,
    cuda: bool = False,
    allow_spinning: bool | None = None,
    graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    **settings,
) -> ort.SessionOptions:
    """ORT session options with the custom-op library registered.

    ``intra_op_num_threads`` defaults to the number of cores ORT would use anyway; inter-op
    parallelism stays off (one thread) so that the thread count means what users expect.
    ``allow_spinning=False`` turns off the intra-op pool's busy waiting, which is the right choice when
    several sessions are timed side by side. Other keyword arguments are set as attributes of
    ``SessionOptions`` (for example ``enable_mem_pattern=False``).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = graph_optimization_level
    options.inter_op_num_threads = 1
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = int(intra_op_num_threads)
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    for key, value in settings.items():
        setattr(options, key, value)
    path = cuda_library_path() if cuda else None
    if cuda and path is None:
        raise LibraryNotFoundError(f"{_CUDA_LIBRARY_NAME} was not built (no nvcc at build time?)")
    _point_at_openblas()
    options.register_custom_ops_library(path or library_path())
    return options
