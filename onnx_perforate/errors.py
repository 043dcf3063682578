"""Exceptions raised by onnx-perforate. All derive from :class:`PerforateError` (a ``ValueError``),
and their messages name the node and tensor involved and say what was expected."""

from __future__ import annotations


class PerforateError(ValueError):
    """Base class of the package's errors."""


class UnknownNodeError(PerforateError, KeyError):
    """A mask names a node (or output tensor) that is not a Conv of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedNodeError(PerforateError):
    """The node cannot be perforated (1-D/3-D convolution, quantized convolution, not a Conv...)."""


class MaskError(PerforateError):
    """A mask is unusable: wrong shape, no computed position, bad rate."""


class MaskShapeError(MaskError):
    """A mask's shape differs from its Conv's spatial output size."""


class EmptyMaskError(MaskError):
    """A mask computes no position at all."""


class DynamicShapeError(PerforateError):
    """A Conv's spatial input or output size is not known statically."""


class DataError(PerforateError):
    """Input data (image folder, .npz/.npy, labels file) cannot be read or does not fit the model."""


class SettingError(PerforateError):
    """A numeric setting lies outside its valid range (the message names the setting and the range)."""


class InvalidLibraryError(PerforateError):
    """A file named as the custom-op library is not a complete shared library for this machine, or not ours."""
