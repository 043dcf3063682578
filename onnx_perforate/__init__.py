"""onnx-perforate: perforated convolutions for ONNX models, run by ONNX Runtime custom ops."""

from ._library import (
    DOMAIN,
    OPSET_VERSION,
    LibraryNotFoundError,
    cuda_kernels_library_path,
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
    "cuda_kernels_library_path",
    "cuda_library_path",
    "has_library",
    "library_path",
    "session_options",
]

from . import masks  # noqa: E402
from .errors import (  # noqa: E402
    DataError,
    DynamicShapeError,
    EmptyMaskError,
    MaskError,
    MaskShapeError,
    PerforateError,
    UnknownNodeError,
    UnsupportedNodeError,
)
from .inspection import ConvRecord, format_table, inspect  # noqa: E402
from .rewrite import LayerReport, RewriteReport, rewrite, rewrite_with_report  # noqa: E402
from .rewrite import save as rewrite_save  # noqa: E402

__all__ += [
    "masks",
    "DataError",
    "DynamicShapeError",
    "EmptyMaskError",
    "MaskError",
    "MaskShapeError",
    "PerforateError",
    "UnknownNodeError",
    "UnsupportedNodeError",
    "ConvRecord",
    "format_table",
    "inspect",
    "LayerReport",
    "RewriteReport",
    "rewrite",
    "rewrite_with_report",
    "rewrite_save",
]

from .tuning import TuneResult, TuneStep, tune  # noqa: E402

__all__ += ["TuneResult", "TuneStep", "tune"]
