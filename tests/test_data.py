"""Data loading: image folders with a preprocessing spec, .npz/.npy arrays, labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnx_perforate.data import PRESETS, PreprocessSpec, load_arrays, load_data, load_folder, read_labels
from onnx_perforate.errors import DataError


def _image(path, w, h, colour):
    Image.new("RGB", (w, h), colour).save(path)


def test_spec_resize_crop_bgr_mean_std_layout():
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    spec = PreprocessSpec(size=10, crop=8, mean=(1, 2, 3), std=(2, 2, 2), bgr=True, scale=1.0)
    x = spec.apply(image)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[:, 0, 0], [(30 - 1) / 2, (20 - 2) / 2, (10 - 3) / 2])
    nhwc = PreprocessSpec(layout="nhwc", scale=1 / 255).apply(image)
    assert nhwc.shape == (20, 40, 3) and np.isclose(nhwc[0, 0, 0], 10 / 255)
    gray = PreprocessSpec(channels=1).apply(image)
    assert gray.shape == (1, 20, 40)
    assert PRESETS["caffe"].bgr and PRESETS["caffe"].crop == 224
    with pytest.raises(DataError):
        PreprocessSpec(layout="CHW")
    with pytest.raises(DataError, match="mean"):
        PreprocessSpec(mean=(1, 2))


def test_folder_with_labels_file(tmp_path):
    for i, name in enumerate(["b.png", "a.jpg", "c.png"]):
        _image(tmp_path / name, 12, 10, (i * 50, 0, 0))
    (tmp_path / "labels.txt").write_text("a.jpg 3\nb.png 1\n# comment\nc.png 7\n")
    data = load_folder(tmp_path, PreprocessSpec(crop=8), limit=2)
    assert len(data) == 2 and data.labels.tolist() == [3, 1]
    ((x, y),) = list(data.batches(5))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [3, 1]


def test_folder_with_class_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        _image(tmp_path / cls / "1.png", 8, 8, (1, 2, 3))
    data = load_data(tmp_path, spec=PreprocessSpec())
    assert data.labels.tolist() == [0, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_folder(tmp_path, PreprocessSpec())
    _image(tmp_path / "a.png", 8, 8, (0, 0, 0))
    (tmp_path / "labels.txt").write_text("b.png 1\n")
    with pytest.raises(DataError, match="no label"):
        load_folder(tmp_path, PreprocessSpec())
    (tmp_path / "bad.txt").write_text("a.png one\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        read_labels(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="spec"):
        load_data(tmp_path)


def test_npz_keys_and_layout(tmp_path):
    x = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1, 2]))
    data = load_arrays(tmp_path / "d.npz", input_shape=["N", 3, 4, 5])
    (batch, labels), = list(data.batches(8))
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == np.float32 and labels.tolist() == [1, 2]
    assert np.array_equal(batch, x.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "named.npz", image=x[..., :1, 0], other=x)
    one_channel = load_arrays(tmp_path / "named.npz", input_name="image", input_shape=[None, 1, 4, 1])
    assert next(one_channel.batches(1))[0].shape == (1, 1, 4, 1)
    np.save(tmp_path / "d.npy", x)
    assert load_arrays(tmp_path / "d.npy", limit=1).labels is None and len(load_arrays(tmp_path / "d.npy", limit=1)) == 1
    with pytest.raises(DataError, match="wants"):
        load_arrays(tmp_path / "d.npy", input_shape=[1, 3, 7, 7])
    np.savez(tmp_path / "empty.npz", foo=x)
    with pytest.raises(DataError, match="no input array"):
        load_arrays(tmp_path / "empty.npz")
    with pytest.raises(DataError):
        load_arrays(tmp_path / "d.csv")
