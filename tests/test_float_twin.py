"""Impact masks and the tuner on QDQ models, through the float twin (onnx_perforate.float_twin): the twin
keeps the INT8 weights and the quantization ranges (the Relu quantize_static folds into a zero point),
its gradients are not zero, the masks name the QDQ model's Convs, and tune perforates and times the INT8
model itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_perforate
from onnx_perforate import impact, tuning
from onnx_perforate.calibration import calibration_set
from onnx_perforate.cli import main
from onnx_perforate.errors import PerforateError
from onnx_perforate.float_twin import float_twin, is_qdq

from helpers import ORT_EXACT_QUANTIZATION, labelled_batches, needs_library, run_ort, synthetic_cnn, synthetic_input

pytestmark = needs_library
quantization = pytest.importorskip("onnxruntime.quantization")


def float_cnn() -> onnx.ModelProto:
    """helpers.synthetic_cnn with conv2's Constant weight as an initializer, so that quantize_static gives
    it per-channel int8 weights (a Constant-node weight is quantized like an activation: per tensor,
    asymmetric uint8)."""
    model = synthetic_cnn()
    constant = next(n for n in model.graph.node if n.op_type == "Constant")
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(constant.attribute[0].t), "w2"))
    model.graph.node.remove(constant)
    return model


class Reader(quantization.CalibrationDataReader):
    def __init__(self, x):
        self.items = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def quantize(model, folder) -> onnx.ModelProto:
    onnx.save(model, folder / "float.onnx")
    quantization.quantize_static(str(folder / "float.onnx"), str(folder / "qdq.onnx"), Reader(synthetic_input(16)),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8, **ORT_EXACT_QUANTIZATION)
    return onnx.load(str(folder / "qdq.onnx"))


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    return quantize(float_cnn(), tmp_path_factory.mktemp("twin"))


def test_twin_keeps_int8_weights_and_quantization_ranges(qdq):
    twin = float_twin(qdq)
    assert is_qdq(qdq) and not is_qdq(twin)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in twin.graph.node}
    assert [n.name for n in twin.graph.node if n.op_type == "Conv"] == ["conv1", "conv2"]
    # conv1's weight is the dequantized int8 tensor, per output channel.
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == next(
        c for c in qdq.graph.node if c.name == "conv1").input[1])
    expected = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(-1, 1, 1, 1)
    twin_inits = {i.name: numpy_helper.to_array(i) for i in twin.graph.initializer}
    np.testing.assert_array_equal(twin_inits[dq.output[0]], expected)
    # quantize_static dropped conv2's Relu into the zero point: the twin must clamp there too.
    x = synthetic_input(8, seed=7)
    int8, twin_out, original = (run_ort(m, {"x": x}, library=False)[0] for m in (qdq, twin, float_cnn()))
    step = float(numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == "logits_scale")))
    assert np.abs(twin_out - int8).max() <= 4 * step, "the twin strays from the INT8 network by more than rounding"
    assert np.abs(twin_out - original).max() < 0.05


def test_twin_of_an_ir3_model_lists_its_initializers_as_inputs(qdq):
    """IR version 3 (SqueezeNet 1.1's) requires every initializer among the graph inputs."""
    old = onnx.ModelProto()
    old.CopyFrom(qdq)
    old.ir_version = 3
    old.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                           for i in old.graph.initializer)
    twin = float_twin(old)
    inputs, inits = {v.name for v in twin.graph.input}, {i.name for i in twin.graph.initializer}
    assert inits <= inputs and inputs - inits == {"x"}
    onnx.checker.check_model(twin)
    x = synthetic_input(2)
    np.testing.assert_allclose(run_ort(twin, {"x": x}, library=False)[0],
                               run_ort(float_twin(qdq), {"x": x}, library=False)[0], rtol=1e-6)


def test_impact_masks_on_a_qdq_model_are_nonzero_and_rewrite_it(qdq):
    data = [{"x": x} for x in np.split(synthetic_input(16), 2)]
    convs = impact.spatial_convs(qdq)
    estimator = impact.ImpactEstimator(qdq, calibration_set(qdq, data), convs)
    maps = estimator.impact()
    assert set(maps) == {"conv1", "conv2"}
    assert all(np.count_nonzero(m) > m.size // 2 for m in maps.values()), "impact through Q/DQ must not vanish"
    # The float model's own impact ranks positions much like the twin's (the masks carry over).
    float_maps = impact.ImpactEstimator(float_cnn(), calibration_set(float_cnn(), data), convs).impact()
    for name in maps:
        assert np.corrcoef(maps[name].ravel(), float_maps[name].ravel())[0, 1] > 0.8
    chosen = impact.impact(qdq, data, 0.5)
    perforated = onnx_perforate.rewrite(qdq, chosen)
    assert sum(n.op_type == "PerforatedQLinearConv" for n in perforated.graph.node) == 2
    assert np.isfinite(run_ort(perforated, {"x": synthetic_input(2)})[0]).all()


def test_tune_on_a_qdq_model_perforates_and_times_the_int8_model(qdq):
    # monotone=False: every rung is a step whether or not it pays on this tiny model (about 15 us, where
    # a rung saves about 1 us: within a loaded machine's noise); the INT8 model is still what is timed.
    result = onnx_perforate.tune(qdq, labelled_batches(), ladder=(0.0, 0.5), repeats=2, progress=False,
                                 max_accuracy_drop=1.0, baselines=False, monotone=False)
    kinds = {n.op_type for n in result.model.graph.node}
    assert "PerforatedQLinearConv" in kinds and "PerforatedConv" not in kinds
    assert "QuantizeLinear" in kinds  # the rest of the graph stays INT8
    assert len(result.steps) > 1 and result.settings["latency_table"]


def test_tune_on_an_s8s8_model_with_a_constant_node_weight(tmp_path):
    """quantize_static's default activations (int8), and conv2's weight left a Constant node (quantized
    in the graph, asymmetric int8): the twin, the masks and the INT8 rewrite handle them all."""
    onnx.save(synthetic_cnn(), tmp_path / "float.onnx")
    quantization.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "s8s8.onnx"), Reader(synthetic_input(16)),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8)
    model = onnx.load(str(tmp_path / "s8s8.onnx"))
    result = onnx_perforate.tune(model, labelled_batches(), ladder=(0.0, 0.5), repeats=2, progress=False,
                                 max_accuracy_drop=1.0, baselines=False, monotone=False)  # as above
    kinds = [n.op_type for n in result.model.graph.node]
    assert "PerforatedQLinearConv" in kinds and "PerforatedConv" not in kinds and len(result.steps) > 1
    assert np.asarray(run_ort(result.model, {"x": synthetic_input(2)})[0]).shape == (2, 5)


def test_cli_tune_accepts_a_qdq_model(qdq, tmp_path, capsys, monkeypatch):
    # Every rung pays, whatever the load: the test is about the QDQ model, not the timings.
    monkeypatch.setattr(tuning.LatencyTable, "saving", lambda table, unit, rate: 1e-4 * rate)
    onnx.save(qdq, tmp_path / "qdq.onnx")
    np.savez(tmp_path / "data.npz", images=synthetic_input(24), labels=np.arange(24) % 5)
    assert main(["tune", str(tmp_path / "qdq.onnx"), "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "out"),
                 "--ladder", "0,0.5", "--repeats", "2", "--max-accuracy-drop", "1", "--subset-size", "16",
                 "--no-progress"]) == 0
    tuned = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert any(n.op_type == "PerforatedQLinearConv" for n in tuned.graph.node)
    assert "speedup" in capsys.readouterr().out


def test_qoperator_models_are_refused_naming_the_node(tmp_path):
    onnx.save(float_cnn(), tmp_path / "float.onnx")
    quantization.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qop.onnx"), Reader(synthetic_input(4)),
                                 quant_format=quantization.QuantFormat.QOperator, per_channel=True,
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    model = onnx.load(str(tmp_path / "qop.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    with pytest.raises(PerforateError, match=f"QLinearConv node '{conv.name}'.*QDQ"):
        float_twin(model)


def test_float_models_pass_through_unchanged():
    model = float_cnn()
    assert float_twin(model) is model
    bad = helper.make_model(model.graph)
    assert not is_qdq(bad)
