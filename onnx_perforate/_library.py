"""Locating the compiled custom-op library and building ORT session options that load it."""

from __future__ import annotations

import logging
import os
import platform
import struct
import sys
from pathlib import Path

import onnxruntime as ort

from .errors import InvalidLibraryError
from .validation import threads

log = logging.getLogger(__name__)

DOMAIN = "onnx_perforate"
OPSET_VERSION = 1
_LIBRARY_NAME = "libonnx_perforate_ops.so"
_CUDA_LIBRARY_NAME = "libonnx_perforate_ops_cuda.so"
_CUDA_KERNELS_NAME = "libonnx_perforate_cuda_kernels.so"


# ORT's log severities: the package's own sessions log errors only. ORT warns about what those
# sessions do on purpose (a derived graph leaves initializers unused, say), dozens of lines per session
# on real models; the debug switch turns the warnings back on.
ORT_WARNING, ORT_ERROR, ORT_FATAL = 2, 3, 4
_ort_warnings = os.environ.get("ONNX_PERFORATE_ORT_WARNINGS", "") not in ("", "0")
_ort_errors = True


def show_ort_warnings(enabled: bool = True) -> None:
    """Let the package's ORT sessions print ORT's warnings (also ``ONNX_PERFORATE_ORT_WARNINGS=1`` and
    the CLI's ``--log-level DEBUG``); by default they log at error level."""
    global _ort_warnings
    _ort_warnings = bool(enabled)


def hide_ort_errors(hidden: bool = True) -> None:
    """Keep ORT's error log lines off stderr (the CLI does: every ORT error also comes back as the
    exception it reports, in one line)."""
    global _ort_errors
    _ort_errors = not hidden


def ort_log_severity() -> int:
    """The ``log_severity_level`` of the package's ORT sessions."""
    return ORT_WARNING if _ort_warnings else ORT_ERROR if _ort_errors else ORT_FATAL


def plain_session_options() -> ort.SessionOptions:
    """ORT session options without the library, at the package's log severity."""
    options = ort.SessionOptions()
    options.log_severity_level = ort_log_severity()
    return options


class LibraryNotFoundError(FileNotFoundError):
    """The compiled custom-op library is not installed (and ONNX_PERFORATE_LIBRARY is not set)."""


# ELF e_machine of the CPUs Python reports in platform.machine().
_ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "ppc64le": 21, "s390x": 22, "riscv64": 243}
# Byte offsets in the ELF header and program header, by class (1: 32-bit, 2: 64-bit).
_ELF_LAYOUT = {
    1: dict(word="I", header="<HHIIIIIHHHHHH", program="<IIIIIIII"),
    2: dict(word="Q", header="<HHIQQQIHHHHHH", program="<IIQQQQQQ"),
}


def check_shared_library(path) -> None:
    """Refuse ``path`` unless it is a complete ELF shared object for this machine: loading a truncated
    copy (or another file) into the process kills it with SIGBUS or worse, so the header, the program
    headers' file ranges and the section header table are checked against the file size first."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            raise InvalidLibraryError(f"{path} is not a shared library (no ELF header)")
        elf_class, data = ident[4], ident[5]
        if elf_class != (2 if sys.maxsize > 2**32 else 1) or data != (1 if sys.byteorder == "little" else 2):
            raise InvalidLibraryError(f"{path} is a {32 if elf_class == 1 else 64}-bit "
                                      f"{'little' if data == 1 else 'big'}-endian ELF file, not one for this machine")
        layout = _ELF_LAYOUT[elf_class]
        header = f.read(struct.calcsize(layout["header"]))
        if len(header) < struct.calcsize(layout["header"]):
            raise InvalidLibraryError(f"{path} is truncated (incomplete ELF header)")
        (e_type, e_machine, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum,
         _) = struct.unpack(layout["header"], header)
        if e_type != 3:  # ET_DYN
            raise InvalidLibraryError(f"{path} is an ELF file but not a shared library (e_type {e_type})")
        expected = _ELF_MACHINES.get(platform.machine().lower())
        if expected is not None and e_machine != expected:
            raise InvalidLibraryError(f"{path} is built for another CPU (ELF machine {e_machine}, this one is "
                                      f"{platform.machine()}, machine {expected})")
        if e_phoff + e_phnum * e_phentsize > size or (e_shoff and e_shoff + e_shnum * e_shentsize > size):
            raise InvalidLibraryError(f"{path} is truncated: its ELF tables extend past the end of the file "
                                      f"({size} bytes); reinstall or rebuild it")
        for index in range(e_phnum):
            f.seek(e_phoff + index * e_phentsize)
            entry = struct.unpack(layout["program"], f.read(struct.calcsize(layout["program"])))
            p_type, p_offset, p_filesz = (entry[0], entry[1], entry[4]) if elf_class == 1 else (entry[0], entry[2], entry[5])
            if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
                raise InvalidLibraryError(f"{path} is truncated: a loadable segment ends at byte {p_offset + p_filesz}, "
                                          f"past the end of the file ({size} bytes); reinstall or rebuild it")


def _find(name: str, env: str) -> Path | None:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LibraryNotFoundError(f"{env}={override} does not name a file")
        check_shared_library(path)
        return path
    path = Path(__file__).resolve().parent / "lib" / name
    if not path.is_file():
        return None
    check_shared_library(path)
    return path


def _source_tree() -> Path | None:
    """The source checkout this package is imported from, if it is one (it has no compiled library)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "custom_ops").is_dir() else None


def library_path() -> str:
    """Path of the CPU custom-op library (``ONNX_PERFORATE_LIBRARY`` overrides it)."""
    path = _find(_LIBRARY_NAME, "ONNX_PERFORATE_LIBRARY")
    if path is None:
        tree = _source_tree()
        if tree is not None:
            raise LibraryNotFoundError(
                f"onnx_perforate is imported from the source tree {tree} (the current directory or PYTHONPATH), "
                f"which shadows the installed package and has no {_LIBRARY_NAME}; run from another directory, "
                "or point ONNX_PERFORATE_LIBRARY at a built copy"
            )
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
    custom_ops: bool = True,
    allow_spinning: bool | None = None,
    graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    **settings,
) -> ort.SessionOptions:
    """ORT session options with the custom-op library registered.

    ``intra_op_num_threads`` defaults to the number of cores ORT would use anyway; inter-op
    parallelism stays off (one thread) so that the thread count means what users expect.
    ``allow_spinning=False`` turns off the intra-op pool's busy waiting, which is the right choice when
    several sessions are timed side by side. Other keyword arguments are set as attributes of
    ``SessionOptions`` (for example ``enable_mem_pattern=False``). ``custom_ops=False`` leaves the
    library out (same conventions otherwise), for graphs of standard ops that must run without it.
    ORT logs errors only (see :func:`show_ort_warnings`).
    """
    options = plain_session_options()
    options.graph_optimization_level = graph_optimization_level
    options.inter_op_num_threads = 1
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = threads(intra_op_num_threads, "intra_op_num_threads")
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    for key, value in settings.items():
        setattr(options, key, value)
    if not custom_ops:
        return options
    path = cuda_library_path() if cuda else None
    if cuda and path is None:
        raise LibraryNotFoundError(f"{_CUDA_LIBRARY_NAME} was not built (no nvcc at build time?)")
    _point_at_openblas()
    path = path or library_path()
    try:
        options.register_custom_ops_library(path)
    except Exception as exc:  # a valid shared object that is not the custom-op library
        raise InvalidLibraryError(f"ONNX Runtime cannot register {path} as the custom-op library: "
                                  f"{' '.join(str(exc).split())}") from exc
    return options
