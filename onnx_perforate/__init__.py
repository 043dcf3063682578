"""onnx-perforate: perforated convolutions for ONNX models, run by ONNX Runtime custom ops.

The public names below are resolved on first use (PEP 562), so ``import onnx_perforate`` stays light:
the library helpers (``_library``), the reference ops (``ops``) and the CUDA kernels binding
(``cuda_kernels``) import without onnx-graphsurgeon or onnx-ad, which only ``rewrite`` and ``tune``
need. A machine that only runs the kernels (a bare GPU box) can therefore use the package as is.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> (submodule, attribute in it); attribute None means the submodule itself.
_EXPORTS = {
    "DOMAIN": ("_library", "DOMAIN"),
    "OPSET_VERSION": ("_library", "OPSET_VERSION"),
    "LibraryNotFoundError": ("_library", "LibraryNotFoundError"),
    "cuda_kernels_library_path": ("_library", "cuda_kernels_library_path"),
    "cuda_library_path": ("_library", "cuda_library_path"),
    "has_library": ("_library", "has_library"),
    "library_path": ("_library", "library_path"),
    "session_options": ("_library", "session_options"),
    "show_ort_warnings": ("_library", "show_ort_warnings"),
    "register_schemas": ("opset", "register_schemas"),
    "masks": ("masks", None),
    "DataError": ("errors", "DataError"),
    "DynamicShapeError": ("errors", "DynamicShapeError"),
    "EmptyMaskError": ("errors", "EmptyMaskError"),
    "InvalidLibraryError": ("errors", "InvalidLibraryError"),
    "MaskError": ("errors", "MaskError"),
    "MaskShapeError": ("errors", "MaskShapeError"),
    "PerforateError": ("errors", "PerforateError"),
    "SettingError": ("errors", "SettingError"),
    "UnknownNodeError": ("errors", "UnknownNodeError"),
    "UnsupportedNodeError": ("errors", "UnsupportedNodeError"),
    "ConvRecord": ("inspection", "ConvRecord"),
    "format_table": ("inspection", "format_table"),
    "inspect": ("inspection", "inspect"),
    "LayerReport": ("rewrite", "LayerReport"),
    "RewriteReport": ("rewrite", "RewriteReport"),
    "rewrite": ("rewrite", "rewrite"),
    "rewrite_with_report": ("rewrite", "rewrite_with_report"),
    "rewrite_save": ("rewrite", "save"),
    "TuneResult": ("tuning", "TuneResult"),
    "TuneStep": ("tuning", "TuneStep"),
    "tune": ("tuning", "tune"),
    "FinetuneResult": ("finetune", "FinetuneResult"),
    "finetune": ("finetune", "finetune"),
}

__all__ = list(_EXPORTS)

# onnx's shape inference and checker learn the domain's ops on import; opset.py imports only onnx,
# numpy, the library helpers and ops.py.
importlib.import_module(".opset", __name__).register_schemas()


def __getattr__(name: str):
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``onnx_perforate.rewrite`` the function, as the eager package had it.

    Importing the submodule ``onnx_perforate.rewrite`` (``from onnx_perforate.rewrite import ...``)
    makes the import system bind the module object to the package attribute of the same name, which
    would shadow the public function. Such a binding is dropped; the submodule stays in sys.modules.
    """

    def __setattr__(self, name: str, value) -> None:
        export = _EXPORTS.get(name)
        shadows_export = (
            export is not None
            and export[1] is not None
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
        )
        if not shadows_export:
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static tools see the eager imports; runtime stays lazy
    from . import masks
    from ._library import (
        DOMAIN,
        OPSET_VERSION,
        LibraryNotFoundError,
        cuda_kernels_library_path,
        cuda_library_path,
        has_library,
        library_path,
        session_options,
        show_ort_warnings,
    )
    from .opset import register_schemas
    from .errors import (
        DataError,
        DynamicShapeError,
        EmptyMaskError,
        InvalidLibraryError,
        MaskError,
        MaskShapeError,
        PerforateError,
        SettingError,
        UnknownNodeError,
        UnsupportedNodeError,
    )
    from .inspection import ConvRecord, format_table, inspect
    from .rewrite import LayerReport, RewriteReport, rewrite, rewrite_with_report
    from .rewrite import save as rewrite_save
    from .finetune import FinetuneResult, finetune
    from .tuning import TuneResult, TuneStep, tune
