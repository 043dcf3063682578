"""onnx-perforate: perforated convolutions for ONNX models, run by ONNX Runtime custom ops."""

from ._library import (
    DOMAIN,
    OPSET_VERSION,
    LibraryNotFoundError,
    cuda_library_path,
    has_library,
    library_path,
    session_options,
)

__version__ = "0.1.0"

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "LibraryNotFoundError",
    "cuda_library_path",
    "has_library",
    "library_path",
    "session_options",
]
