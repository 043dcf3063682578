"""Calibration data in every accepted form, and the evenly spaced split."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_perforate.calibration import CalibrationSet, calibration_set
from onnx_perforate.data import load_arrays
from onnx_perforate.errors import DataError

from helpers import synthetic_cnn, synthetic_input


def test_feeds_and_labelled_pairs():
    model = synthetic_cnn()
    x = synthetic_input(6)
    unlabelled = calibration_set(model, [{"x": x[:4]}, {"x": x[4:]}])
    assert unlabelled.inputs.shape == (6, 3, 12, 12) and unlabelled.labels is None
    labelled = calibration_set(model, [({"x": x[:4]}, np.arange(4)), ({"x": x[4:]}, np.arange(2))])
    np.testing.assert_array_equal(labelled.labels, [0, 1, 2, 3, 0, 1])


def test_calibration_data_reader():
    """ORT's quantization CalibrationDataReader protocol: get_next() until None."""

    class Reader:
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    x = synthetic_input(5)
    result = calibration_set(synthetic_cnn(), Reader([{"x": x[:3]}, {"x": x[3:]}]))
    np.testing.assert_array_equal(result.inputs, x)


def test_npz_path_and_dataset(tmp_path):
    x = (synthetic_input(10) * 255).astype(np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, images=x, labels=np.arange(10) % 3)
    model = synthetic_cnn()
    from_path = calibration_set(model, path)
    from_dataset = calibration_set(model, load_arrays(path, input_name="x"))
    np.testing.assert_array_equal(from_path.inputs, from_dataset.inputs)
    assert from_path.inputs.dtype == np.float32 and len(from_path.labels) == 10


def test_dict_of_named_arrays(tmp_path):
    """A dict as an .npz holds it (what np.load gives, or arrays in memory) is data, not an iterable of
    its keys."""
    x = synthetic_input(6)
    model = synthetic_cnn()
    labelled = calibration_set(model, {"images": x, "labels": np.arange(6) % 2})
    np.testing.assert_array_equal(labelled.inputs, x)
    np.testing.assert_array_equal(labelled.labels, np.arange(6) % 2)
    by_input_name = calibration_set(model, {"x": x})
    assert by_input_name.labels is None and len(by_input_name) == 6
    # NHWC arrays are fitted to the model's NCHW input, as the CLI fits an .npz
    np.testing.assert_array_equal(calibration_set(model, {"x": x.transpose(0, 2, 3, 1)}).inputs, x)
    with pytest.raises(DataError, match=r"no input array: keys \['pixels'\]"):
        calibration_set(model, {"pixels": x})
    with pytest.raises(DataError, match="labels must be integer class indices"):
        calibration_set(model, {"x": x, "labels": np.full(6, 0.5)})
    with pytest.raises(DataError, match=r"a calibration item is a ndarray, expected a dict of inputs \{'x': array\}"):
        calibration_set(model, [x[:3], x[3:]])


def test_subset_is_evenly_spaced_and_split_holds_out_the_rest():
    """Sorted-by-class data (common) must not give a calibration set of the first classes only."""
    labels = np.repeat(np.arange(5), 20)  # 100 images sorted by class
    data = CalibrationSet("x", np.zeros((100, 1), np.float32), labels)
    chosen, rest = data.split(10)
    assert set(chosen.labels) == set(range(5))
    assert len(chosen) + len(rest) == 100
    assert data.split(None) == (data, None)


def test_wrong_input_name_and_empty_data():
    model = synthetic_cnn()
    with pytest.raises(DataError, match="'x'"):
        calibration_set(model, [{"image": synthetic_input(2)}])
    with pytest.raises(DataError, match="empty"):
        calibration_set(model, [])
