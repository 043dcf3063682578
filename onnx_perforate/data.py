"""Evaluation data: a folder of images with a preprocessing spec, or ``.npz`` / ``.npy`` arrays.

Both give a :class:`Dataset` that yields float32 batches in the model's layout, with labels when known.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from . import validation
from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class PreprocessSpec:
    """How an image file becomes a model input.

    Steps, in order: decode as RGB (or grayscale when ``channels == 1``); resize so the shorter side
    is ``size`` (bilinear; skipped if None); centre-crop ``crop`` x ``crop`` (skipped if None); to
    float32 and multiply by ``scale``; reorder to BGR if ``bgr``; subtract ``mean`` and divide by
    ``std`` (both given in the *output* channel order); transpose to ``layout`` (NCHW or NHWC).
    """

    size: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False
    layout: str = "NCHW"
    scale: float = 1.0
    channels: int = 3

    def __post_init__(self):
        self.layout = self.layout.upper()
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {self.channels}")
        self.size = validation.optional_integer(self.size, "size")
        self.crop = validation.optional_integer(self.crop, "crop")
        self.scale = validation.real(self.scale, "scale", minimum=0.0, exclusive_minimum=True)
        for name in ("mean", "std"):
            bounds = dict(minimum=0.0, exclusive_minimum=True) if name == "std" else {}
            values = tuple(validation.real(v, f"a {name} value", **bounds) for v in np.atleast_1d(getattr(self, name)))
            if len(values) not in (1, self.channels):
                raise DataError(f"{name} has {len(values)} values, expected "
                                + ("1 (the model takes 1 channel)" if self.channels == 1 else f"1 or {self.channels}"))
            setattr(self, name, values)

    def apply(self, image) -> np.ndarray:
        """A PIL image -> float32 array [C, H, W] or [H, W, C] (no batch axis)."""
        from PIL import Image

        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.size:
            w, h = image.size
            factor = self.size / min(w, h)
            image = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
        if self.crop:
            w, h = image.size
            if self.crop > min(w, h):
                raise DataError(f"crop {self.crop} is larger than the image ({w}x{h}); set --size")
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        array = np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], -1) * self.scale
        if self.bgr and self.channels == 3:
            array = array[:, :, ::-1]
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1) if self.layout == "NCHW" else array)


# Named specs for common models.
PRESETS = {
    # Caffe/Caffe2 ImageNet models (e.g. SqueezeNet 1.1 from the ONNX model zoo): BGR, 0..255, mean only.
    "caffe": PreprocessSpec(size=256, crop=224, mean=(104.0, 117.0, 123.0), bgr=True),
    # torchvision ImageNet models.
    "torchvision": PreprocessSpec(size=256, crop=224, scale=1 / 255, mean=(0.485, 0.456, 0.406),
                                  std=(0.229, 0.224, 0.225)),
    "raw": PreprocessSpec(),
}


@dataclass
class Dataset:
    """Inputs and optional labels; ``load`` gives the inputs of items ``[start, stop)``."""

    size: int
    load: "callable"
    labels: np.ndarray | None = None
    description: str = ""

    def __len__(self) -> int:
        return self.size

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for start in range(0, self.size, batch_size):
            stop = min(start + batch_size, self.size)
            labels = None if self.labels is None else self.labels[start:stop]
            yield self.load(start, stop), labels


def check_labels(labels, source: str = "labels", *, classes: int | None = None) -> np.ndarray:
    """``labels`` as int64 [N] if they are a 1-D array of integer class indices in [0, classes);
    anything else (one-hot rows, floats, strings, negative values, indices past the model's classes)
    is refused, since it would silently give a wrong accuracy."""
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integer class indices, got {array.dtype} values"
                        + (" (cast them to integers)" if array.dtype.kind == "f" else ""))
    if array.ndim != 1:
        hint = (f" (one-hot rows? pass their argmax: {source}.argmax(axis=1))"
                if array.ndim == 2 and array.shape[1] > 1 else "")
        raise DataError(f"{source}: labels must be a 1-D array of class indices, got shape {list(array.shape)}{hint}")
    if array.size and array.min() < 0:
        position = int(array.argmin())
        raise DataError(f"{source}: label {int(array[position])} at position {position} is negative; "
                        "class indices start at 0")
    if classes is not None and array.size and array.max() >= classes:
        position = int(array.argmax())
        raise DataError(f"{source}: label {int(array[position])} at position {position} is not a class of the "
                        f"model, which has {classes} outputs (expected 0 <= label < {classes})")
    return array.astype(np.int64)


def check_finite(x: np.ndarray, source: str, first: int = 0) -> np.ndarray:
    """``x`` (inputs ``first``, ``first + 1``...) unless it holds NaN or an infinity, which would give
    NaN outputs and a meaningless accuracy or loss."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise DataError(f"{source}: input {first + int(bad[0])} holds {x[tuple(bad)]} at index {bad[1:].tolist()}; "
                        "inputs must be finite numbers")
    return x


def read_labels(path) -> dict[str, int]:
    """A labels file: lines ``FILE CLASS_INDEX`` (blank lines and ``#`` comments ignored)."""
    labels = {}
    if not Path(path).is_file():
        raise DataError(f"labels file {path} " + ("is a folder, expected a text file" if Path(path).is_dir()
                                                 else "does not exist"))
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {path} as text (lines 'FILE CLASS_INDEX'): {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            labels[parts[0]] = int(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{number}: expected 'FILE CLASS_INDEX', got {line!r}") from None
    return labels


def load_folder(folder, spec: PreprocessSpec, *, labels=None, limit: int | None = None, input_shape=None) -> Dataset:
    """Images under ``folder`` in sorted order. Labels come from ``labels`` (a ``FILE CLASS_INDEX``
    file; the default is ``folder/labels.txt`` when present) or, failing that, from class
    subfolders (sorted subfolder names are the class indices). Every preprocessed image must have the
    static dims of ``input_shape`` (the model's, batch first) when given, else the first image's shape."""
    limit = validation.optional_integer(limit, "limit")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    label_file = Path(labels) if labels else folder / "labels.txt"
    values = None
    if label_file.is_file():
        table = read_labels(label_file)
        keyed = {str(p.relative_to(folder)): p for p in files}
        missing = [k for k in keyed if k not in table and Path(k).name not in table]
        if missing:
            raise DataError(f"{label_file} has no label for {len(missing)} image(s), e.g. {missing[0]!r}")
        values = [table.get(k, table.get(Path(k).name)) for k in keyed]
    elif labels:
        read_labels(labels)  # says what is wrong with it
    elif all(p.parent != folder for p in files):
        classes = sorted({p.relative_to(folder).parts[0] for p in files})
        values = [classes.index(p.relative_to(folder).parts[0]) for p in files]
    if limit:
        files = files[:limit]
        values = values[:limit] if values is not None else None

    def load(start, stop):
        from PIL import Image

        batch = []
        for path in files[start:stop]:
            try:
                with Image.open(path) as image:
                    array = spec.apply(image)
            except OSError as exc:
                raise DataError(f"cannot read image {path}: {exc}") from exc
            if not fits(array.shape):
                raise DataError(f"image {path} becomes {list(array.shape)} ({spec.layout}) after preprocessing, "
                                f"expected {list(wanted)} ({origin}); check --layout, and set --size and --crop "
                                "(or a --preset) so that every image gets the model's input size")
            batch.append(array)
        return np.stack(batch)

    wanted = tuple(input_shape[1:]) if input_shape is not None and len(input_shape) == 4 else None
    origin = "the model input" if wanted and all(isinstance(d, int) for d in wanted) else f"the size of {files[0]}"

    def fits(shape) -> bool:
        nonlocal wanted
        if not shape_fits(shape, wanted or shape):
            return False
        wanted = tuple(shape)  # dynamic dims take the first image's size: a batch stacks equal shapes
        return True

    labels_array = None if values is None else check_labels(np.asarray(values, dtype=np.int64), str(label_file))
    return Dataset(len(files), load, labels_array, f"{len(files)} images from {folder}")


_INPUT_KEYS = ("images", "x", "inputs", "data")
_LABEL_KEYS = ("labels", "y", "targets")


def load_arrays(path, *, input_name: str | None = None, input_shape=None, limit: int | None = None) -> Dataset:
    """Inputs from ``.npy`` (the array) or ``.npz`` (see :func:`arrays_dataset` for the keys). Values are
    used as stored (cast to float32)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".npy":
        try:
            x = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise DataError(f"cannot read {path} as a .npy array of numbers: {exc}") from exc
        return arrays_dataset({"x": x}, input_name=input_name, input_shape=input_shape, limit=limit,
                              source=str(path))
    if path.suffix == ".npz":
        try:
            with np.load(path) as archive:
                wanted = ((input_name,) if input_name else ()) + _INPUT_KEYS + _LABEL_KEYS
                # every name (for the message when no input is found), the values only of those read
                arrays = {**dict.fromkeys(archive.files), **{k: archive[k] for k in wanted if k in archive.files}}
        except Exception as exc:  # not a zip, a truncated member, pickled objects...
            raise DataError(f"cannot read {path} as a .npz archive of numeric arrays: {exc}") from exc
        return arrays_dataset(arrays, input_name=input_name, input_shape=input_shape, limit=limit,
                              source=str(path))
    raise DataError(f"{path}: expected a .npz or .npy file (or an image folder)")


def arrays_dataset(arrays: Mapping, *, input_name: str | None = None, input_shape=None,
                   limit: int | None = None, source: str = "the data") -> Dataset:
    """Inputs and labels from named arrays (an ``.npz`` archive's, or a dict): the inputs under
    ``input_name``, else ``images``/``x``/``inputs``/``data``; labels under ``labels``/``y``/``targets``.
    When ``input_shape`` (the model's, with None/str for dynamic dims) is given and the arrays are NHWC
    where the model wants NCHW (or the reverse), they are transposed; a 3-D array for a 1-channel model
    gets its channel axis."""
    limit = validation.optional_integer(limit, "limit")
    keys = [k for k in ((input_name,) if input_name else ()) + _INPUT_KEYS if k in arrays]
    if not keys:
        raise DataError(f"{source} has no input array: keys {sorted(map(str, arrays))}, expected one of "
                        f"{[input_name] if input_name else []}{list(_INPUT_KEYS)}")
    x = arrays[keys[0]]
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    name = f"{source}[{keys[0]!r}]"
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name} holds {x.dtype} values, expected numbers")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{name} has shape {list(x.shape)}: expected inputs stacked along a first axis, [N, ...] "
                        "with N >= 1")
    label_key = next((k for k in _LABEL_KEYS if k in arrays), None)
    labels = check_labels(arrays[label_key], f"{source}[{label_key!r}]") if label_key else None
    if labels is not None and len(labels) != len(x):
        raise DataError(f"{source}: {len(labels)} labels ({label_key!r}) for {len(x)} inputs ({keys[0]!r}); "
                        "expected one label per input")
    if limit:
        x = x[:limit]
        labels = labels[:limit] if labels is not None else None
    x = _fit_layout(x, input_shape, source)

    def load(start, stop):
        return check_finite(np.ascontiguousarray(x[start:stop], dtype=np.float32), name, start)

    return Dataset(len(x), load, labels, f"{len(x)} arrays from {source}")


def shape_fits(shape, want) -> bool:
    """Whether ``shape`` has ``want``'s rank and static dims (a dim of ``want`` that is not an int: any)."""
    return len(shape) == len(want) and all(not isinstance(w, int) or w == d for w, d in zip(want, shape))


def _fit_layout(x, input_shape, source: str):
    if input_shape is None or len(input_shape) != 4:
        return x
    want = tuple(input_shape[1:])

    def fits(shape):
        return shape_fits(shape, want)

    if x.ndim == 3 and want[0] == 1:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: arrays have shape {list(x.shape)}, expected [N, {', '.join(map(str, want))}]")
    if fits(x.shape[1:]):
        return x
    for perm, name in (((0, 3, 1, 2), "NHWC -> NCHW"), ((0, 2, 3, 1), "NCHW -> NHWC")):
        if fits(tuple(x.shape[i] for i in perm[1:])):
            log.info("%s: transposing the arrays %s to fit the model input", source, name)
            return x.transpose(perm)
    raise DataError(f"{source}: arrays have shape {list(x.shape)}, the model wants [N, {', '.join(map(str, want))}]")


def load_data(path, *, spec: PreprocessSpec | None = None, labels=None, input_name=None, input_shape=None,
              limit=None) -> Dataset:
    """A folder of images (with ``spec``) or a ``.npz``/``.npy`` file."""
    path = Path(path)
    if path.is_dir():
        if spec is None:
            raise DataError(f"{path} is an image folder: a preprocessing spec is needed")
        return load_folder(path, spec, labels=labels, limit=limit, input_shape=input_shape)
    return load_arrays(path, input_name=input_name, input_shape=input_shape, limit=limit)
