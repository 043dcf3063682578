"""The greedy tuner: the steps it takes, where it stops, what it writes, and resuming."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnx_perforate
from onnx_perforate import tuning
from onnx_perforate.errors import PerforateError

from helpers import GraphBuilder, fire, labelled_batches, needs_library, run_ort, synthetic_cnn, synthetic_input

pytestmark = needs_library


def test_climbs_every_ladder_and_records_the_curve(tmp_path):
    model = synthetic_cnn()
    # monotone=False here and below: the test is about the curve's record, not about which rungs the
    # (timed) latency table lets pay, so every rung is a step whatever the machine's load.
    result = onnx_perforate.tune(model, labelled_batches(), ladder=(0.0, 0.5), repeats=3, progress=False,
                                 monotone=False)
    assert result.steps[0].layer is None and result.steps[0].speedup == 1.0
    assert [s.step for s in result.steps] == list(range(len(result.steps)))
    assert sorted(s.layer for s in result.steps[1:]) == ["conv1", "conv2"]  # one rung each, then done
    assert result.stopped.startswith("every layer")
    assert {m.kind for m in result.masks.values()} == {"impact"}
    assert all(abs(m.achieved_rate - 0.5) < 0.02 for m in result.masks.values())
    assert result.steps[0].top1 is not None  # labelled data: accuracy is reported
    onnx.checker.check_model(result.model, full_check=True)
    paths = result.save(tmp_path / "out")
    report = json.loads(open(paths["report"]).read())
    assert len(report["steps"]) == len(result.steps)
    for key in ("plot", "masks"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| step |" in result.table()


def test_stops_before_the_accuracy_budget_is_exceeded():
    model = synthetic_cnn()
    result = onnx_perforate.tune(model, labelled_batches(), ladder=(0.0, 0.6, 0.9), max_accuracy_drop=0.0,
                                 mask_kind="uniform", repeats=3, progress=False, monotone=False)
    base = result.steps[0].top1
    assert all(base - s.top1 <= 0.0 for s in result.steps)
    assert "would drop accuracy" in result.stopped or result.stopped.startswith("every layer")


def test_checkpoint_resumes_where_it_stopped(tmp_path, monkeypatch):
    model = synthetic_cnn()
    checkpoint = tmp_path / "tune.json"
    # monotone=False: every rung is a step, whatever the (timed) latency table says
    settings = dict(ladder=(0.0, 0.3, 0.6), layers=["conv1"], repeats=3, progress=False, baselines=False,
                    monotone=False)
    measured = []  # the models each run measures: the baseline and every candidate it tries
    measure = tuning.NetworkMeter.measure

    def counting_measure(meter, candidate, **options):
        if stop_after_checkpoint and checkpoint.exists():
            raise KeyboardInterrupt  # Ctrl-C right after the first step was saved
        measured.append(candidate)
        return measure(meter, candidate, **options)

    monkeypatch.setattr(tuning.NetworkMeter, "measure", counting_measure)
    stop_after_checkpoint = False
    straight = onnx_perforate.tune(model, labelled_batches(), **settings)
    straight_work, measured[:] = len(measured), []
    assert len(straight.steps) == 3  # the baseline and conv1's two rungs

    stop_after_checkpoint = True
    first = onnx_perforate.tune(model, labelled_batches(), checkpoint=checkpoint, **settings)
    assert first.stopped.startswith("interrupted") and len(first.steps) == 2
    stop_after_checkpoint, measured[:] = False, []
    again = onnx_perforate.tune(model, labelled_batches(), checkpoint=checkpoint, **settings)
    # Resumed: the saved step is kept as recorded, and only the rung left is tried (one candidate
    # fewer than the straight run measured).
    assert again.steps[1] == first.steps[1] and len(again.steps) == len(straight.steps)
    assert len(measured) == straight_work - 1
    np.testing.assert_array_equal(np.asarray(again.masks["conv1"]), np.asarray(straight.masks["conv1"]))


def test_model_at_rebuilds_every_step_after_a_resume(tmp_path):
    """A resume after two steps used to leave step 1's masks as None, and model_at(1) crashed."""
    model = synthetic_cnn()
    checkpoint = tmp_path / "tune.json"
    # monotone=False: every rung is a step whatever the timings say (a rung that does not pay on a loaded
    # machine would otherwise be skipped, and the curve would have two steps).
    settings = dict(ladder=(0.0, 0.3, 0.6), layers=["conv1"], repeats=3, progress=False, checkpoint=checkpoint,
                    monotone=False)
    first = onnx_perforate.tune(model, labelled_batches(), **settings)
    again = onnx_perforate.tune(model, labelled_batches(), **settings)  # resumes with nothing left to do
    assert len(again.step_masks) == len(again.steps) == 3  # the middle step is the one a resume used to lose
    for step in range(3):
        assert again.model_at(model, step).SerializeToString() == first.model_at(model, step).SerializeToString()
    assert any(n.op_type == "PerforatedConv" for n in again.model_at(model, 2).graph.node)
    with pytest.raises(PerforateError, match="not on the curve"):
        again.model_at(model, 3)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(PerforateError, match="conv7"):
        onnx_perforate.tune(synthetic_cnn(), labelled_batches(), layers=["conv7"], progress=False)


def test_unlabelled_data_uses_agreement(tmp_path):
    x = synthetic_input(16)
    result = onnx_perforate.tune(synthetic_cnn(), [{"x": x}], ladder=(0.0, 0.5), layers=["conv2"], repeats=3,
                                 progress=False)
    assert result.steps[0].top1 is None and result.steps[0].agreement == 1.0
    assert result.settings["loss"] == "kl"


def test_model_at_rebuilds_every_point_of_the_curve():
    model = synthetic_cnn()
    result = onnx_perforate.tune(model, labelled_batches(), ladder=(0.0, 0.5), repeats=3, progress=False,
                                 monotone=False)
    assert len(result.step_masks) == len(result.steps)
    first = result.model_at(model, 0)  # step 0 is the original network
    assert [n.op_type for n in first.graph.node] == [n.op_type for n in model.graph.node]
    last = result.model_at(model, len(result.steps) - 1)
    assert {n.name for n in last.graph.node if n.op_type == "PerforatedConv"} >= set(result.masks)


def test_compact_regions_group_fire_modules():
    from onnx_perforate.tuning import compact_regions
    g = GraphBuilder(channels=4, hw=10)
    f2 = fire(g, "x", 4, "fire2")
    f3 = fire(g, f2, 8, "fire3")
    pooled = g.op("MaxPool", [f3], "pool", kernel_shape=[2, 2], strides=[2, 2])
    f4 = fire(g, pooled, 8, "fire4")
    model = g.model([f4])
    convs = [r.name for r in onnx_perforate.inspect(model)]
    regions = compact_regions(model, convs)
    sizes = sorted(len(m) for m in regions.values())
    assert sizes == [3, 6]  # fire2 + fire3 share a grid; the max-pool starts a new region
    assert all(all(m.startswith("fire4") for m in members) or not any(m.startswith("fire4") for m in members)
               for members in regions.values())


def test_tied_regions_share_one_mask():
    g = GraphBuilder(channels=4, hw=10)
    f2 = fire(g, "x", 4, "fire2")
    out = g.op("GlobalAveragePool", [f2], "gap")
    model = g.model([out])
    x = np.random.default_rng(0).uniform(0.1, 1.0, (16, 4, 10, 10)).astype(np.float32)
    result = onnx_perforate.tune(model, [{"x": x}], ladder=(0.0, 0.5), tie="regions", repeats=3, progress=False,
                                 monotone=False)
    assert len(result.steps) == 2 and set(result.masks) == {"fire2_sq", "fire2_e1", "fire2_e3"}
    arrays = [np.asarray(m) for m in result.masks.values()]
    assert all((a == arrays[0]).all() for a in arrays)


# ------------------------------------------------------------------------------------------------
# Baselines, recovery, the default budget and the latency table (bundled Fashion-MNIST CNN)


def _fashion(count=160):
    from helpers import SAMPLE_MODELS

    with np.load(SAMPLE_MODELS / "fashion_mnist_subset.npz") as data:
        idx = np.arange(0, 1000, 1000 // count)[:count]  # every class (the subset is sorted by class)
        x, y = data["images"][idx].astype(np.float32), data["labels"][idx].astype(np.int64)
    return onnx.load(SAMPLE_MODELS / "fashion_cnn.onnx"), [({"image": x}, y)]


def test_report_has_the_resize_baseline_and_recovery(tmp_path):
    model, data = _fashion()
    result = onnx_perforate.tune(model, data, ladder=(0.0, 0.5), layers=["conv4", "conv5"], subset_size=96,
                                 repeats=3, batch_size=32, timing_batch=8, progress=False,
                                 finetune={"method": "bn_reestimation"}, monotone=False)
    resize = result.baselines["resize"]
    assert resize["available"] and resize["data"] == "held-out" and resize["data_images"] == 64
    assert [p["size"] for p in resize["points"]] == [[25, 25], [22, 22], [20, 20], [17, 17]]
    assert all(p["speedup"] > 0 and 0 <= p["top1"] <= 1 for p in resize["points"])
    assert set(resize["models"]) == {"perforated", "recovered"}
    assert "smaller input" in result.summary() and "| input 22x22 |" in result.baseline_table()
    # the recovery is reported before and after on the held-out images, and the model is the recovered one
    assert result.recovery["method"] == "bn_reestimation"
    assert {"tuned_agreement", "recovered_agreement"} <= set(result.holdout)
    assert "after recovery (bn_reestimation)" in result.summary()
    # the latency table timed each unit once, at every rung
    table = result.settings["latency_table"]["units"]
    assert set(table) <= {"conv4", "conv5"} and all(len(u["measured_ms"]) == 1 for u in table.values())
    report = json.loads(open(result.save(tmp_path / "out")["report"]).read())
    assert report["baselines"]["resize"]["points"] and report["recovery"]["method"] == "bn_reestimation"


def test_resize_baseline_says_when_the_model_cannot_take_another_size():
    from onnx import TensorProto, helper, numpy_helper

    from onnx_perforate.calibration import calibration_set
    from onnx_perforate.tuning import resize_baseline

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32), "w"),
             numpy_helper.from_array((0.1 * rng.standard_normal((256, 5))).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Flatten", ["c"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"], name="classifier")]
    graph = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = calibration_set(model, [{"x": rng.uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)}])
    result = resize_baseline(model, data, threads=1, batch_size=8, timing_batch=1, repeats=2)
    assert not result["available"] and not result["points"]
    assert "cannot take another input size" in result["reason"] and "7x7" in result["reason"]


def test_default_accuracy_budget():
    from onnx_perforate.tuning import DEFAULT_MAX_ACCURACY_DROP

    model, data = _fashion(96)
    result = onnx_perforate.tune(model, data, ladder=(0.0, 0.6, 0.9), layers=["conv1", "conv2"], repeats=2,
                                 batch_size=32, timing_batch=4, progress=False, baselines=False)
    assert result.settings["max_accuracy_drop"] == DEFAULT_MAX_ACCURACY_DROP == 0.10
    assert all(result.steps[0].top1 - s.top1 <= 0.10 for s in result.steps)
    assert result.baselines == {}


class _FakeLatency:
    """LatencyTable.predict from fixed savings (ms) per (unit, rate): no timing."""

    def __init__(self, savings):
        self.savings = savings

    def predict(self, rates):
        return 10.0 - sum(self.savings[unit][rate] for unit, rate in rates.items() if rate > 0)


def test_next_rung_skips_rungs_that_would_slow_the_network_down():
    ladder = (0.0, 0.2, 0.35, 0.5, 0.8)
    latency = _FakeLatency({"a": {0.2: -1.0, 0.35: -0.2, 0.5: 0.4, 0.8: 1.0},
                            "b": {0.2: 0.3, 0.35: 0.5, 0.5: 0.6, 0.8: 0.6},
                            "c": {0.2: -2.0, 0.35: -1.5, 0.5: -1.0, 0.8: -0.5}})
    assert tuning.next_rung(latency, ladder, {}, "a", 0) == 3  # 0.2 and 0.35 cost more than they save
    assert tuning.next_rung(latency, ladder, {"a": 0.5}, "a", 3) == 4
    assert tuning.next_rung(latency, ladder, {}, "b", 0) == 1  # pays at once: one rung
    assert tuning.next_rung(latency, ladder, {"b": 0.35}, "b", 2) == 3
    assert tuning.next_rung(latency, ladder, {"b": 0.5}, "b", 3) is None  # 0.8 saves nothing more
    assert tuning.next_rung(latency, ladder, {"a": 0.5}, "c", 0) is None  # no rung pays: not moved


def test_monotone_steps_make_the_predicted_network_faster_every_time():
    model, data = _fashion(96)
    result = onnx_perforate.tune(model, data, ladder=(0.0, 0.2, 0.35, 0.5, 0.65, 0.8), layers=["conv2", "conv4"],
                                 repeats=2, batch_size=32, timing_batch=4, progress=False, baselines=False,
                                 max_accuracy_drop=1.0)
    times = [s.time_ms for s in result.steps]
    assert all(after < before for before, after in zip(times, times[1:])), times  # never a slower step
    assert result.settings["monotone"] is True


def test_saving_line_ignores_a_rung_timed_during_a_burst_of_load():
    rates = [0.2, 0.35, 0.5, 0.6, 0.7, 0.8]
    # measured on a shared machine (ms): the layer never pays, but its first rung and 0.7 were
    # timed during bursts of load; least squares predicted +0.96 ms saved at 0.2
    savings = [2.03, -0.78, -0.75, -0.55, -3.22, -0.28]
    fixed, slope = tuning.saving_line(rates, savings)
    assert all(fixed + slope * r < 0 for r in rates)
    lsq_slope, lsq_fixed = np.polyfit(rates, savings, 1)
    assert lsq_fixed + lsq_slope * 0.2 > 0  # what the least-squares line said
    # clean points: the line through them; the slope is never negative
    assert tuning.saving_line([0.2, 0.5, 0.8], [-0.4, 0.2, 0.8]) == pytest.approx((-0.8, 2.0))
    assert tuning.saving_line([0.2, 0.5], [0.3, 0.1])[1] == 0.0


def test_step_recovery_judges_candidates_on_the_recovered_network(monkeypatch):
    """After every step the BatchNorm statistics are re-estimated on the network so far; the next
    candidates are rewritten from the original carrying them, and so is the final model."""
    from onnx_perforate.finetune import with_values

    recoveries, events = [], []
    recover_step, perforate = tuning._recover_step, tuning._perforate

    def recording(analysed, masks, calibration, method, threads):
        working, values = recover_step(analysed, masks, calibration, method, threads)
        recoveries.append((sorted(k for k, v in masks.items() if not np.asarray(v, bool).all()), values, working))
        events.append(("recovered", working))
        return working, values

    def building(analysed, masks):
        events.append(("built", analysed))
        return perforate(analysed, masks)

    monkeypatch.setattr(tuning, "_recover_step", recording)
    monkeypatch.setattr(tuning, "_perforate", building)
    model, data = _fashion()
    result = onnx_perforate.tune(model, data, ladder=(0.0, 0.5), layers=["conv4", "conv5"], subset_size=96,
                                 repeats=3, batch_size=32, timing_batch=8, progress=False, monotone=False,
                                 baselines=False, step_recovery="bn_reestimation")
    assert len(recoveries) == len(result.steps) - 1 >= 1  # once per step
    assert result.settings["step_recovery"] == "bn_reestimation"
    layers, values, _ = recoveries[-1]
    assert layers == sorted(result.masks)
    # the candidates of the second step (the builds after the first recovery's re-measure, before the
    # second recovery) were built from the network the first recovery returned
    assert len(recoveries) >= 2 and recoveries[0][1]
    first, second = [i for i, (kind, _) in enumerate(events) if kind == "recovered"][:2]
    candidates = [built for kind, built in events[first + 2:second] if kind == "built"]
    assert candidates and all(built is recoveries[0][2] for built in candidates)
    batchnorm = {name for n in model.graph.node if n.op_type == "BatchNormalization" for name in n.input[1:5]}
    assert values and set(values) <= batchnorm  # only BatchNormalization was recovered
    x = data[0][0]["image"][:8]
    expected = onnx_perforate.rewrite(with_values(model, values), result.masks)
    without = onnx_perforate.rewrite(model, result.masks)
    got = run_ort(result.model, {"image": x})[0]
    np.testing.assert_allclose(got, run_ort(expected, {"image": x})[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, run_ort(without, {"image": x})[0], rtol=1e-4, atol=1e-5)
    # a later recovery needs the values the model carries: refused without them, accepted with them
    from onnx_perforate.finetune import finetune

    with pytest.raises(PerforateError, match="start=TuneResult.values"):
        finetune(result.model, model, data, method="bias_correction", progress=False, threads=1)
    assert result.values == values
    finetune(result.model, model, data, method="bias_correction", progress=False, threads=1, start=result.values)


def test_step_recovery_setting_is_checked():
    with pytest.raises(PerforateError, match="step_recovery must be one of"):
        onnx_perforate.tune(synthetic_cnn(), labelled_batches(), step_recovery="distill", progress=False)


def test_auto_tie_offers_single_convs_and_whole_regions(monkeypatch):
    """tie="auto": candidates are each 3x3 Conv alone and each region of several Convs; a Conv moves with
    one unit only, and the steps stay predicted faster one after the other."""
    g = GraphBuilder(channels=4, hw=10)
    f2 = fire(g, "x", 4, "fire2")
    f3 = fire(g, f2, 8, "fire3")
    out = g.op("GlobalAveragePool", [f3], "gap")
    model = g.model([out])
    # every move pays in proportion to the MACs it skips, whatever the machine's load
    macs = {r.name: r.macs for r in onnx_perforate.inspect(model)}

    def saving(table, unit, rate):
        return 1e-9 * rate * sum(macs[m] for m in table.ladder.units[unit])

    monkeypatch.setattr(tuning.LatencyTable, "saving", saving)
    x = np.random.default_rng(0).uniform(0.1, 1.0, (16, 4, 10, 10)).astype(np.float32)
    tried = []
    expand = tuning.MaskLadder.expand

    def recording(ladder, masks):
        tried.append({u for u, m in masks.items() if not np.asarray(m, bool).all()})
        return expand(ladder, masks)

    monkeypatch.setattr(tuning.MaskLadder, "expand", recording)
    result = onnx_perforate.tune(model, [{"x": x}], ladder=(0.0, 0.3, 0.6), tie="auto", repeats=3,
                                 progress=False, max_accuracy_drop=1.0, baselines=False)
    region = "fire2_sq (+5)"
    assert {"fire2_e3", "fire3_e3", region} <= set().union(*tried)  # both kinds of move were candidates
    for step in result.steps[1:]:  # never a Conv in two moved units
        members = [m for unit in step.rates for m in ([unit] if unit != region else tuning.compact_regions(
            model, [r.name for r in onnx_perforate.inspect(model) if r.perforable])[region])]
        assert len(members) == len(set(members))
    times = [s.time_ms for s in result.steps]
    assert all(b < a for a, b in zip(times, times[1:]))
    # regions saving ten times more: the region moves first, and its 3x3 Convs are no longer offered alone
    monkeypatch.setattr(tuning.LatencyTable, "saving", lambda table, unit, rate: saving(table, unit, rate) * (
        10 if len(table.ladder.units[unit]) > 1 else 1))
    tried.clear()
    result = onnx_perforate.tune(model, [{"x": x}], ladder=(0.0, 0.3, 0.6), tie="auto", repeats=3,
                                 progress=False, max_accuracy_drop=1.0, baselines=False)
    assert result.steps[1].layer == region and set(result.steps[-1].rates) == {region}
    first_region_step = next(i for i, t in enumerate(tried) if region in t)
    assert not any(t & {"fire2_e3", "fire3_e3"} for t in tried[first_region_step + 1:])
    with pytest.raises(PerforateError, match="tie must be one of"):
        onnx_perforate.tune(model, [{"x": x}], tie="everything", progress=False)


def test_step_recovery_with_nothing_to_recover():
    """bias_correction after a step that perforated only a Conv without bias (synthetic conv2) recovers
    nothing and the search goes on; bn_reestimation on a model without BatchNormalization is refused
    before any timing."""
    result = onnx_perforate.tune(synthetic_cnn(), labelled_batches(), ladder=(0.0, 0.5), layers=["conv2"],
                                 repeats=3, progress=False, monotone=False, baselines=False,
                                 step_recovery="bias_correction")
    assert set(result.masks) == {"conv2"}
    g = GraphBuilder(channels=4, hw=10)
    model = g.model([g.op("GlobalAveragePool", [fire(g, "x", 4, "fire2")], "gap")])
    x = np.random.default_rng(0).uniform(0.1, 1.0, (8, 4, 10, 10)).astype(np.float32)
    with pytest.raises(PerforateError, match="no BatchNormalization"):
        onnx_perforate.tune(model, [{"x": x}], step_recovery="bn_reestimation", progress=False)
    with pytest.raises(PerforateError, match="no candidate among"):  # a 1x1 Conv alone in auto mode
        onnx_perforate.tune(model, [{"x": x}], tie="auto", layers=["fire2_sq"], progress=False)


def test_few_calibration_images_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="onnx_perforate.tuning"):
        onnx_perforate.tune(synthetic_cnn(), labelled_batches(n=8, batch=8), ladder=(0.0, 0.5), layers=["conv1"],
                            repeats=2, progress=False, monotone=False, baselines=False)
    assert "8 calibration image(s)" in caplog.text


class _LinearLatency:
    """10 ms, less 5 ms per unit of rate of every unit."""

    def predict(self, rates):
        return 10.0 - sum(5.0 * rate for rate in rates.values())


def test_landing_rate_is_the_least_rate_that_reaches_the_target():
    latency = _LinearLatency()
    assert tuning.landing_rate(latency, {}, "a", 0.5, 0.8, target_time=7.0) == pytest.approx(0.6)
    assert tuning.landing_rate(latency, {"b": 0.2}, "a", 0.0, 0.8, target_time=7.0) == pytest.approx(0.4)
    assert tuning.landing_rate(latency, {}, "a", 0.5, 0.6, target_time=7.0) is None  # only the rung itself
    assert tuning.landing_rate(latency, {}, "a", 0.55, 0.9, target_time=7.2) == pytest.approx(0.56)


def _landing_tune(monkeypatch, measured_speedups, clock=None):
    """conv4 alone on a ladder (0, 0.5, 0.9) whose top rung overshoots a 1.4x target; every unit of rate
    saves half the original's time, and the end-to-end confirmation measures ``measured_speedups``
    (landed model, ladder's model), then ``clock`` for a model cut back by the clock (None: not expected)."""
    model, data = _fashion(96)
    monkeypatch.setattr(tuning.LatencyTable, "saving", lambda table, unit, rate: 0.5 * table.base * rate)
    timed = []
    answers = [measured_speedups] + ([[clock]] if clock is not None else [])

    def confirmation(meter, reference, sessions, repeats):
        timed.append(len(sessions))
        return [1.0 / s for s in answers[len(timed) - 1][:len(sessions)]]

    monkeypatch.setattr(tuning, "interleaved_ratios", confirmation)
    result = onnx_perforate.tune(model, data, target_speedup=1.4, ladder=(0.0, 0.5, 0.9), layers=["conv4"],
                                 repeats=2, batch_size=32, timing_batch=4, progress=False, baselines=False,
                                 max_accuracy_drop=1.0)
    # the landed model timed beside the ladder's move, then the clock's cut alone
    assert timed == ([2] if clock is None else [2, 1])
    return result


def test_a_last_move_that_overshoots_the_target_lands_on_it(monkeypatch):
    result = _landing_tune(monkeypatch, [1.43, 1.8])
    # 1 / (1 - 0.5 r) >= 1.4 x 1.01 from r = 0.5857: the least rate on the 0.01 grid is 0.59, not 0.9
    assert result.steps[-1].rates == {"conv4": pytest.approx(0.59)}
    assert result.masks["conv4"].rate == pytest.approx(0.59)
    assert abs(result.masks["conv4"].achieved_rate - 0.59) < 0.01
    assert 1.4 <= result.final.speedup < 1.45
    assert result.settings["landing"] == dict(unit="conv4", rate=pytest.approx(0.59), ladder_rate=0.9,
                                              measured_speedup=1.43, ladder_measured_speedup=1.8, kept="landed")
    assert result.settings["measured_speedup"] == 1.43
    assert "clock_landing" not in result.settings  # within 3% of the target on the clock
    assert result.stopped.startswith("reached the target")
    masks = result.step_masks[-1]["conv4"]
    assert abs(1 - masks.mean() - 0.59) < 0.01  # the curve's last point is the landed network


def test_a_landed_move_that_misses_the_target_on_the_clock_falls_back_to_the_ladder(monkeypatch):
    result = _landing_tune(monkeypatch, [1.3, 1.8])
    assert result.steps[-1].rates == {"conv4": 0.9}
    assert result.masks["conv4"].rate == 0.9 and abs(result.masks["conv4"].achieved_rate - 0.9) < 0.01
    assert result.settings["landing"]["kept"] == "ladder"
    assert result.settings["measured_speedup"] == 1.8
    assert abs(1 - result.step_masks[-1]["conv4"].mean() - 0.9) < 0.01


def test_the_summary_says_where_the_last_move_landed(monkeypatch):
    assert "conv4 at 0.59 instead of 0.9" in _landing_tune(monkeypatch, [1.43, 1.8]).summary()
    assert "the ladder's 0.9 (1.80x) was kept instead" in _landing_tune(monkeypatch, [1.3, 1.8]).summary()


def test_a_final_model_beyond_the_target_on_the_clock_gives_the_excess_back(monkeypatch):
    """The landed model (0.59) times 1.6x where 1.42x was predicted: the table, scaled by 1.6 / 1.42,
    predicts the target from just above the previous step's 0.5, so conv4 is cut to 0.51, timed again
    (1.42x, on target) and kept."""
    result = _landing_tune(monkeypatch, [1.6, 1.8], clock=1.42)
    assert result.steps[-1].rates == {"conv4": pytest.approx(0.51)}
    assert result.masks["conv4"].rate == pytest.approx(0.51)
    assert abs(1 - result.step_masks[-1]["conv4"].mean() - 0.51) < 0.01
    assert result.settings["clock_landing"] == dict(unit="conv4", rate=pytest.approx(0.51), from_rate=pytest.approx(0.59),
                                                    measured_speedup=1.42, from_measured_speedup=1.6, kept=True)
    assert result.settings["measured_speedup"] == 1.42
    assert "conv4 tried at 0.51 instead of 0.59, timed 1.42x (kept)" in result.summary()


def test_a_cut_the_clock_finds_short_of_the_target_is_not_kept(monkeypatch):
    result = _landing_tune(monkeypatch, [1.6, 1.8], clock=1.35)
    assert result.steps[-1].rates == {"conv4": pytest.approx(0.59)}
    assert result.masks["conv4"].rate == pytest.approx(0.59)
    assert result.settings["clock_landing"]["kept"] is False
    assert result.settings["measured_speedup"] == 1.6
    assert "short of the target on the clock: 0.59 was kept" in result.summary()


def test_timed_sessions_use_threads_and_the_rest_evaluation_threads(monkeypatch):
    from onnx_perforate import runtime

    made, timed = {}, []
    session, time_interleaved = runtime.session, runtime.time_interleaved

    def recording_session(model, threads=None, **options):
        s = session(model, threads, **options)
        made[id(s)] = threads
        return s

    def recording_timing(sessions, feeds, repeats, **options):
        timed.extend(made[id(s)] for s in sessions)
        return time_interleaved(sessions, feeds, repeats, **options)

    monkeypatch.setattr(runtime, "session", recording_session)
    monkeypatch.setattr(runtime, "time_interleaved", recording_timing)
    model, data = _fashion(64)
    result = onnx_perforate.tune(model, data, target_speedup=1.2, ladder=(0.0, 0.5), layers=["conv4"], repeats=2,
                                 batch_size=32, timing_batch=4, threads=1, evaluation_threads=2, progress=False,
                                 max_accuracy_drop=1.0)
    assert timed and set(timed) == {1}  # the latency table, the confirmation and the resize baseline
    assert 2 in made.values() and set(made.values()) == {1, 2}
    assert result.settings["evaluation_threads"] == 2
    with pytest.raises(Exception, match="evaluation_threads"):
        onnx_perforate.tune(model, data, evaluation_threads=0, progress=False)


def test_a_landed_move_the_budget_refuses_is_neither_taken_nor_reported(monkeypatch):
    """The move to 0.9 is cut to 0.59, and the budget refuses the landed move: the search stops at 0.5,
    and neither the landing nor the refused ladder move is timed or reported."""
    measure = tuning.NetworkMeter.measure
    calls = []

    def scripted(meter, model, *args, **options):
        measured = measure(meter, model, *args, **options)
        calls.append(measured)
        if len(calls) > 2:  # the original and conv4 at 0.5 as measured; every later candidate loses it all
            measured = dict(measured, top1=0.0)
        return measured

    monkeypatch.setattr(tuning.NetworkMeter, "measure", scripted)
    model, data = _fashion(96)
    monkeypatch.setattr(tuning.LatencyTable, "saving", lambda table, unit, rate: 0.5 * table.base * rate)
    timed = []

    def confirmation(meter, reference, sessions, repeats):
        timed.append(len(sessions))
        return [1.0 / 1.3] * len(sessions)

    monkeypatch.setattr(tuning, "interleaved_ratios", confirmation)
    result = onnx_perforate.tune(model, data, target_speedup=1.4, ladder=(0.0, 0.5, 0.9), layers=["conv4"],
                                 repeats=2, batch_size=32, timing_batch=4, progress=False, baselines=False,
                                 max_accuracy_drop=0.5)
    assert "would drop accuracy" in result.stopped and "conv4 -> 0.59" in result.stopped
    assert result.steps[-1].rates == {"conv4": 0.5}
    assert "landing" not in result.settings and timed == [1]
