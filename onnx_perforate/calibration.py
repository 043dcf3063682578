"""Calibration data for impact masks and the tuner, from whatever the user has.

Accepted: a :class:`~onnx_perforate.data.Dataset` (what ``eval`` loads: image folders with a
preprocessing spec, ``.npz``/``.npy``), a path to such data, a dict of named arrays as an ``.npz``
holds them (``{"images": x, "labels": y}`` or ``{input_name: x}``), an iterable of input dicts (optionally
``(feeds, labels)`` pairs), or ONNX Runtime's ``CalibrationDataReader`` (anything with ``get_next()``).
Everything is materialised once as a short list of batches: calibration sets are small, and every
tuner step reads them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx

from . import validation
from .data import Dataset, arrays_dataset, check_finite, check_labels, load_data, shape_fits
from .errors import DataError
from .graph import format_shape
from .runtime import model_input


@dataclass
class CalibrationSet:
    """Batches of model inputs, with labels where known (labels is None for unlabelled data)."""

    input_name: str
    inputs: np.ndarray  # all images, [N, ...]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int):
        """(feeds, labels or None) per batch."""
        for start in range(0, len(self.inputs), batch_size):
            stop = min(start + batch_size, len(self.inputs))
            labels = None if self.labels is None else self.labels[start:stop]
            yield {self.input_name: self.inputs[start:stop]}, labels

    def subset(self, start: int, stop: int) -> "CalibrationSet":
        labels = None if self.labels is None else self.labels[start:stop]
        return CalibrationSet(self.input_name, self.inputs[start:stop], labels)

    def take(self, indices) -> "CalibrationSet":
        labels = None if self.labels is None else self.labels[indices]
        return CalibrationSet(self.input_name, self.inputs[indices], labels)

    def split(self, size: int | None) -> tuple["CalibrationSet", "CalibrationSet | None"]:
        """``size`` evenly spaced images for calibration and the rest held out.

        Evenly spaced, not the first ones: data sets are often sorted by class (CIFAR-10's npz here,
        the bundled Fashion-MNIST subset), and the first images would be a few classes only."""
        if size is None or size >= len(self):
            return self, None
        chosen = np.unique(np.linspace(0, len(self) - 1, size).round().astype(int))
        rest = np.setdiff1d(np.arange(len(self)), chosen)
        return self.take(chosen), self.take(rest)


def _describe(feeds) -> str:
    return f"inputs {sorted(map(str, feeds))}" if isinstance(feeds, Mapping) else f"a {type(feeds).__name__}"


def calibration_set(model: onnx.ModelProto, data, *, subset_size: int | None = None, **load_options) -> CalibrationSet:
    """Materialise ``data`` for ``model`` (see the module docstring for what ``data`` may be); with
    ``subset_size``, keep that many evenly spaced images (see :meth:`CalibrationSet.split`)."""
    name, dims = model_input(model)
    subset_size = validation.optional_integer(subset_size, "subset_size")
    inputs, labels = [], []
    has_labels = True

    def add(x, y):
        nonlocal has_labels
        try:
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"calibration input {name!r} is not numeric: {exc}") from exc
        # the model's static dims, and within the data one shape (the batches are concatenated)
        want = (None, *dims[1:]) if not inputs else (None, *inputs[0].shape[1:])
        if not shape_fits(x.shape, want):
            raise DataError(f"calibration input {name!r} has shape {list(x.shape)}, expected "
                            f"{format_shape(want).replace('?', 'N', 1)}"
                            + (f" like the inputs before it" if inputs else " (the model input)"))
        inputs.append(check_finite(x, f"calibration input {name!r}", sum(map(len, inputs))))
        if y is None:
            has_labels = False
        else:
            y = check_labels(y if np.ndim(y) else [y], "calibration labels")
            if len(y) != len(x):
                raise DataError(f"a calibration batch has {len(x)} inputs and {len(y)} labels")
            labels.append(y)

    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):  # arrays fitted to the model's layout
        data = load_data(data, input_name=name, **{"input_shape": dims, **load_options})
    if isinstance(data, CalibrationSet):
        return data.split(subset_size)[0]
    if isinstance(data, Mapping):  # named arrays, as an .npz archive holds them
        data = arrays_dataset(data, input_name=name, input_shape=dims, source="the data dict")
    if isinstance(data, Dataset):
        for x, y in data.batches(64):
            add(x, y)
    elif hasattr(data, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
        while (feeds := data.get_next()) is not None:
            if not isinstance(feeds, Mapping) or name not in feeds:
                raise DataError(f"the CalibrationDataReader gave {_describe(feeds)}, expected a dict with the input "
                                f"{name!r}")
            add(feeds[name], None)
    elif not isinstance(data, Iterable):
        raise DataError(f"calibration data is a {type(data).__name__}; expected a data set, a path, a dict of arrays, "
                        "an iterable of input dicts or a CalibrationDataReader (see onnx_perforate.calibration)")
    else:
        for item in data:
            feeds, y = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
            if not isinstance(feeds, Mapping):
                raise DataError(f"a calibration item is a {type(feeds).__name__}, expected a dict of inputs "
                                f"{{'{name}': array}} or a (dict, labels) pair")
            if name not in feeds:
                raise DataError(f"a calibration item has {_describe(feeds)}, expected '{name}'")
            add(feeds[name], y)
    if not inputs:
        raise DataError("the calibration data is empty")
    x = np.concatenate(inputs)
    y = np.concatenate(labels) if has_labels and labels else None
    return CalibrationSet(name, x, y).split(subset_size)[0]
