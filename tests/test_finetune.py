"""Tests for onnx_perforate.finetune: weight gradients of the perforated network, distillation and the
training-free recoveries on the bundled Fashion-MNIST CNN, determinism, resume and bad input."""

from __future__ import annotations

import importlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_perforate import PerforateError, rewrite
from onnx_perforate.analysis import analyse
from onnx_perforate.cli import main
from onnx_perforate.finetune import (PerforatedTrainer, augment, finetune, mix, perforation_masks,
                                      trainable_parameters, training_target)
from onnx_perforate.inspection import inspect
from onnx_perforate.masks import grid

from helpers import SAMPLE_MODELS, GraphBuilder, fire, needs_library, to_double

MODEL = SAMPLE_MODELS / "fashion_cnn.onnx"
DATA = SAMPLE_MODELS / "fashion_mnist_subset.npz"


@pytest.fixture(scope="module")
def sample():
    original = onnx.load(MODEL)
    masks = {r.name: np.asarray(grid(tuple(r.output_shape[2:]), 0.5)) for r in inspect(original) if r.perforable}
    with np.load(DATA) as data:
        images, labels = data["images"].astype(np.float32), data["labels"].astype(np.int64)
    return original, rewrite(original, masks), masks, images, labels


def _data(images, labels=None, count=200):
    # every fifth image: all ten classes (the subset is sorted by class)
    idx = np.arange(0, 1000, 1000 // count)[:count]
    return [({"image": images[idx]}, None if labels is None else labels[idx])]


# ------------------------------------------------------------------------------------------------ gradients


def test_weight_gradients_match_float64_central_differences(sample):
    """dL/dW of the perforated network (first conv, a BatchNorm shift, the classifier) from the ORT
    derivative graph against central differences of the same forward graph evaluated in float64 by the
    ONNX reference evaluator: |g - fd| <= 1e-3 |fd| + 1e-5 max|g| (see tests/test_gradients.py)."""
    original, _, masks, images, labels = sample
    params = ["conv1.weight", "bn3.bias", "fc.weight"]
    trainer = PerforatedTrainer(original, masks, params, batch_size=2, threads=1)
    x = images[::500][:2]
    target = np.full((2, 10), 0.02, np.float32)
    target[np.arange(2), labels[::500][:2]] = 0.82
    _, grads = trainer.loss_and_gradients(x, target)

    double = ReferenceEvaluator(to_double(trainer.forward_model))
    gm = trainer.gradient_model
    feeds = {trainer.input_name: x.astype(np.float64), gm.target: target.astype(np.float64)}
    feeds.update({k: v.astype(np.float64) for k, v in trainer.zero_taps.items()})
    rng = np.random.default_rng(3)
    for name in params:
        g = grads[name]
        flat = np.abs(g).ravel()
        picks = list(np.argsort(flat)[-2:]) + list(rng.choice(flat.size, 1))
        for p in picks:
            index = np.unravel_index(p, g.shape)
            losses = []
            for sign in (1, -1):
                values = {k: v.astype(np.float64) for k, v in trainer.values.items()}
                values[name][index] += sign * 1e-4
                run = dict(feeds, **{trainer.forward_feeds[k]: v for k, v in values.items()})
                losses.append(float(double.run([gm.loss], run)[0]))
            fd = (losses[0] - losses[1]) / 2e-4
            assert abs(g[index] - fd) <= 1e-3 * abs(fd) + 1e-5 * flat.max(), (name, index, g[index], fd)


def test_masks_of_a_region_perforated_under_one_mask():
    """Fire modules under one mask each (tune --tie regions): the compact rewrite runs their 1x1 Convs on
    compact tensors with all-ones [1, K] masks, and the max-pool before the second one pools only the
    positions its squeeze computes. The masks read back rewrite the original into the same network."""
    g = GraphBuilder(channels=4, hw=10)
    f2 = fire(g, "x", 4, "fire2")
    pooled = g.op("MaxPool", [f2], "pool", kernel_shape=[2, 2], strides=[2, 2])
    out = g.op("GlobalAveragePool", [fire(g, pooled, 8, "fire3")], "gap")
    model = g.model([out])
    first, second = np.asarray(grid((10, 10), 0.5)), np.asarray(grid((5, 5), 0.4))
    regions = {**{f"fire2_{c}": first for c in ("sq", "e1", "e3")}, **{f"fire3_{c}": second for c in ("sq", "e1", "e3")}}
    perforated = rewrite(model, regions)
    assert any(n.op_type == "CompactPool" and len(n.input) == 3 for n in perforated.graph.node)
    read = perforation_masks(perforated, model)
    assert "fire2_e1" not in read  # a 1x1 Conv on its producer's positions: the same network without it
    assert (read["fire3_sq"] == second).all()  # the pooled positions are its own
    assert all((m == regions[k]).all() for k, m in read.items())
    x = np.random.default_rng(0).uniform(0.1, 1.0, (16, 4, 10, 10)).astype(np.float32)
    result = finetune(perforated, model, [{"x": x}], method="bias_correction", progress=False, threads=1)
    assert {t.name for t in result.model.graph.initializer} == {t.name for t in perforated.graph.initializer}


def test_trainable_parameter_choices(sample):
    original, _, masks, _, _ = sample
    every = trainable_parameters(original, "all", masks)
    assert "conv1.weight" in every and "fc.weight" in every and "bn1.running_mean" not in every
    biases = trainable_parameters(original, "biases", masks)
    assert "conv1.weight" not in biases and "bn1.bias" in biases and "fc.bias" in biases
    only = trainable_parameters(original, "perforated", {"conv5": masks["conv5"]})
    # conv5, the BatchNorm after it and the classifier it feeds; not the layers before
    assert "conv5.weight" in only and "bn5.weight" in only and "fc.weight" in only
    assert "conv4.weight" not in only


# ------------------------------------------------------------------------------------------------ recovery


def _deployed_agreement(model, original, x):
    from onnx_perforate.fallback import session

    a = session(model, 1).run(None, {"image": x})[0].argmax(1)
    b = session(original, 1).run(None, {"image": x})[0].argmax(1)
    return float((a == b).mean())


@needs_library
def test_distillation_lowers_heldout_loss_in_the_deployed_model(sample):
    original, perforated, masks, images, labels = sample
    result = finetune(perforated, original, _data(images, labels), method="distill", epochs=2, progress=False,
                      threads=1)
    assert result.improved
    assert result.after["loss"] < result.before["loss"]
    assert result.after["agreement"] > result.before["agreement"]
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    # the trained values went into the perforated model itself: same graph, new initializers
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in perforated.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in perforated.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert before.keys() == after.keys()
    folded = "conv1.weight_2"  # conv1 with bn1 folded in (the original's "conv1.weight" is gone)
    assert folded in after and not np.array_equal(before[folded], after[folded])
    # and the deployed model agrees with what training measured on the held-out images
    held = np.setdiff1d(np.arange(200), np.unique(np.linspace(0, 199, 160).round().astype(int)))
    x = _data(images)[0][0]["image"][held]
    assert _deployed_agreement(result.model, original, x) == pytest.approx(result.after["agreement"])


def test_early_stopping_reads_the_kl_to_the_original_whatever_the_label_weight(sample):
    """The held-out loss is KL(original || perforated) on the held-out images (here recomputed from the
    two models' outputs), not the training target's loss, which changes with the labels' weight."""
    from onnx_perforate.calibration import CalibrationSet
    from onnx_perforate.fallback import session

    original, perforated, _, images, labels = sample
    data = _data(images, labels, 100)
    runs = [finetune(perforated, original, data, method="distill", epochs=1, label_weight=weight, progress=False,
                     threads=1) for weight in (0.0, 1.0)]
    feeds, y = data[0]
    held = CalibrationSet("image", feeds["image"], y).split(80)[1]

    def log_softmax(model):
        z = session(model, 1).run(None, {"image": held.inputs})[0].astype(np.float64)
        z -= z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    teacher, student = log_softmax(original), log_softmax(perforated)
    kl = float((np.exp(teacher) * (teacher - student)).sum(1).mean())
    nll = float(-student[np.arange(len(held)), held.labels].mean())
    for run in runs:
        assert run.history[0]["loss"] == pytest.approx(kl, rel=1e-3)
        assert run.history[0]["label_loss"] == pytest.approx(nll, rel=1e-3)


def test_never_returns_a_worse_model(sample):
    original, perforated, _, images, labels = sample
    result = finetune(perforated, original, _data(images, labels, 100), method="distill", epochs=1,
                      learning_rate=5.0, progress=False, threads=1, lr_backoff=False)
    assert not result.improved
    assert result.model.SerializeToString() == perforated.SerializeToString()
    assert result.after == result.before


def test_a_first_epoch_that_wrecks_the_network_restarts_at_a_lower_learning_rate(sample):
    original, perforated, _, images, labels = sample
    data = _data(images, labels, 100)
    kept = finetune(perforated, original, data, method="distill", epochs=2, learning_rate=5.0, progress=False,
                    threads=1, lr_backoff=False)
    assert kept.settings["learning_rate_used"] == 5.0
    backed_off = finetune(perforated, original, data, method="distill", epochs=2, learning_rate=5.0,
                          progress=False, threads=1)
    # 5.0 and 0.5 both wreck the first epoch; the back-off stops after two restarts and keeps 0.05
    assert [a["learning_rate"] for a in backed_off.settings["learning_rates_abandoned"]] == [5.0, 0.5]
    assert {a["reason"] for a in backed_off.settings["learning_rates_abandoned"]} == {"wrecked"}
    assert backed_off.settings["learning_rate_used"] == pytest.approx(0.05)
    assert [h["epoch"] for h in backed_off.history] == [0, 1, 2]


def test_a_nan_first_epoch_counts_as_wrecked(sample):
    original, perforated, _, images, labels = sample
    result = finetune(perforated, original, _data(images, labels, 100), method="distill", epochs=1,
                      learning_rate=1e8, progress=False, threads=1)
    assert [a["reason"] for a in result.settings["learning_rates_abandoned"]] == ["wrecked", "wrecked"]


def test_an_all_ones_mask_of_a_plain_conv_is_kept(sample):
    """rewrite(model, {conv: ones}) gives a PerforatedConv on the full input: its mask is read back (only
    Convs run on compact inputs are left out)."""
    original, _, masks, images, _ = sample
    name = sorted(masks)[0]
    ones = rewrite(original, {name: np.ones_like(masks[name])})
    read = perforation_masks(ones, original)
    assert set(read) == {name} and read[name].all()


def test_no_gain_by_early_stopping_restarts_at_a_lower_learning_rate(sample, monkeypatch):
    """The held-out loss here gets worse whenever a weight moves by more than 1e-3 and better below
    that: peak 1e-3 gains nothing in `patience` epochs, so training restarts at 1e-4 and gains."""
    module = importlib.import_module("onnx_perforate.finetune")  # the package exports the function

    class Scripted:
        def __init__(self, trainer, teacher, data):
            self.trainer, self.start = trainer, {k: x.copy() for k, x in trainer.values.items()}

        def __call__(self):
            moved = max(float(np.abs(x - self.start[k]).max()) for k, x in self.trainer.values.items())
            loss = 1.0 if moved == 0 else 1.5 if moved > 1e-3 else 0.5
            return {"loss": loss, "agreement": 0.5, "top1": None, "label_loss": None}

    monkeypatch.setattr(module, "_Evaluator", Scripted)
    original, perforated, _, images, _ = sample
    result = finetune(perforated, original, _data(images, count=100), method="distill", epochs=3, patience=2,
                      learning_rate=1e-3, augment="none", progress=False, threads=1)
    assert result.settings["learning_rates_abandoned"] == [{"learning_rate": 1e-3, "epochs": 2, "reason": "no gain"}]
    assert result.settings["learning_rate_used"] == pytest.approx(1e-4)
    assert result.improved and [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    without = finetune(perforated, original, _data(images, count=100), method="distill", epochs=3, patience=2,
                       learning_rate=1e-3, augment="none", progress=False, threads=1, lr_backoff=False)
    assert not without.improved and without.settings["learning_rates_abandoned"] == []


def test_accepts_analysed_models(sample):
    original, perforated, _, images, _ = sample
    plain = finetune(perforated, original, _data(images), method="bias_correction", progress=False, threads=1)
    analysed = finetune(analyse(perforated), analyse(original), _data(images), method="bias_correction",
                        progress=False, threads=1)
    assert analysed.model.SerializeToString() == plain.model.SerializeToString()
    assert analysed.after == plain.after


@pytest.mark.parametrize("method", ["bias_correction", "bn_reestimation"])
def test_training_free_methods(sample, method):
    original, perforated, _, images, _ = sample
    result = finetune(perforated, original, _data(images), method=method, progress=False, threads=1)
    assert result.improved and result.after["loss"] < result.before["loss"]
    names = {t.name for t in perforated.graph.initializer}
    assert {t.name for t in result.model.graph.initializer} == names


def test_seeded_runs_are_identical(sample):
    original, perforated, _, images, labels = sample
    runs = [finetune(perforated, original, _data(images, labels, 100), method="distill", epochs=1, seed=seed,
                     learning_rate=1e-4, progress=False, threads=1) for seed in (4, 4, 5)]
    assert all(r.improved for r in runs)  # else the input comes back and every run is trivially equal
    weights = [{t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer} for r in runs]
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not np.array_equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert runs[0].history == [dict(h, elapsed_s=runs[0].history[i]["elapsed_s"])
                               for i, h in enumerate(runs[1].history)]


def test_resume_continues_after_the_saved_epoch(sample, tmp_path):
    original, perforated, _, images, labels = sample
    data = _data(images, labels, 100)
    checkpoint = tmp_path / "finetune.npz"
    common = dict(method="distill", epochs=2, patience=5, seed=1, progress=False, threads=1)
    first = finetune(perforated, original, data, checkpoint=checkpoint, time_budget_s=1e-9, **common)
    assert [h["epoch"] for h in first.history] == [0, 1] and checkpoint.exists()
    resumed = finetune(perforated, original, data, checkpoint=checkpoint, **common)
    assert resumed.settings["resumed_epochs"] == 1
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    straight = finetune(perforated, original, data, **common)
    a = {t.name: numpy_helper.to_array(t) for t in resumed.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in straight.model.graph.initializer}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(PerforateError, match="other settings"):
        finetune(perforated, original, data, checkpoint=checkpoint, **dict(common, seed=2))


# ------------------------------------------------------------------------------------------------ bad input


def test_perforated_model_must_match_the_original(sample):
    original, perforated, masks, images, _ = sample
    changed = onnx.ModelProto()
    changed.CopyFrom(perforated)
    weight = next(t for t in changed.graph.initializer if t.name.startswith("conv2.weight"))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    with pytest.raises(PerforateError, match="does not match the original"):
        finetune(changed, original, _data(images, count=20), progress=False)
    squeeze = onnx.load(SAMPLE_MODELS / "fashion_squeeze.onnx")
    with pytest.raises(PerforateError, match="has no Conv of that name"):
        shape = next(tuple(r.output_shape[2:]) for r in inspect(squeeze) if r.name == "fire2/expand3x3")
        perforation_masks(rewrite(squeeze, {"fire2/expand3x3": np.asarray(grid(shape, 0.5))}), original)
    with pytest.raises(PerforateError, match="no PerforatedConv"):
        finetune(original, original, _data(images, count=20), progress=False)


def test_labels_of_the_wrong_shape(sample):
    original, perforated, _, images, labels = sample
    x = images[:20]
    with pytest.raises(PerforateError, match="1-D array of class indices, got shape \\[20, 2\\]"):
        finetune(perforated, original, [({"image": x}, np.stack([labels[:20]] * 2, 1))], progress=False)
    with pytest.raises(PerforateError, match="class indices in"):
        finetune(perforated, original, [({"image": x}, labels[:20] + 10)], progress=False)


def test_model_that_cannot_be_differentiated():
    """MaxRoiPool has no reverse rule in onnx-ad: the error names it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([[0, 0, 0, 7, 7]], np.float32), "rois"),
             numpy_helper.from_array((0.3 * rng.standard_normal((16, 5))).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("MaxRoiPool", ["c", "rois"], ["roi"], pooled_shape=[2, 2], name="roi"),
             helper.make_node("Flatten", ["roi"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "roi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    perforated = rewrite(model, {"conv": np.asarray(grid((8, 8), 0.5))})
    data = [{"x": rng.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    with pytest.raises(PerforateError, match="MaxRoiPool 'roi'"):
        finetune(perforated, model, data, batch_size=1, progress=False)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_finetune(sample, tmp_path, capsys):
    original, perforated, _, images, labels = sample
    onnx.save(perforated, tmp_path / "perforated.onnx")
    idx = np.arange(0, 1000, 10)
    np.savez(tmp_path / "data.npz", images=images[idx], labels=labels[idx])
    out = tmp_path / "recovered.onnx"
    code = main(["finetune", str(tmp_path / "perforated.onnx"), "--original", str(MODEL), "--data",
                 str(tmp_path / "data.npz"), "-o", str(out), "--method", "bn_reestimation", "--no-progress",
                 "--threads", "1"])
    assert code == 0 and out.exists()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == "bn_reestimation" and report["after"]["loss"] <= report["before"]["loss"]
    assert "held-out 20 images" in capsys.readouterr().out
    code = main(["finetune", str(out), "--original", str(SAMPLE_MODELS / "fashion_squeeze.onnx"), "--data",
                 str(tmp_path / "data.npz"), "-o", str(tmp_path / "x.onnx"), "--no-progress"])
    assert code == 1 and "does not match the original" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    code = main(["finetune", str(tmp_path / "perforated.onnx"), "--original", str(MODEL), "--data",
                 str(tmp_path / "data.npz"), "-o", str(tmp_path / "x.onnx"), "--no-progress", "--augment", "flip+blur"])
    assert code == 1 and "augment must be" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_methods_chain(sample):
    original, perforated, _, images, labels = sample
    result = finetune(perforated, original, _data(images, labels, 100), method="bn_reestimation+distill",
                      epochs=1, learning_rate=1e-4, progress=False, threads=1)
    assert [h.get("method") for h in result.history] == ["bn_reestimation", "bn_reestimation", "distill"]
    assert result.after["loss"] <= result.history[1]["loss"] < result.before["loss"]
    auto = finetune(perforated, original, _data(images, labels, 100), epochs=1, progress=False, threads=1)
    assert auto.method == "bn_reestimation+distill"  # the default for a model with BatchNorm
    with pytest.raises(PerforateError, match="method must be one of"):
        finetune(perforated, original, _data(images, count=20), method="bn_reestimation+magic", progress=False)


# ------------------------------------------------------------------------------------------------ augmentation


def test_mixup_blends_each_image_with_a_partner_by_a_uniform_share():
    x = np.random.default_rng(0).random((4000, 3, 4, 4)).astype(np.float32)
    mixed, partner, share = mix(x, "flip+mixup", np.random.default_rng(1))
    assert sorted(partner) == list(range(len(x)))
    np.testing.assert_allclose(mixed, share[:, None, None, None] * x + (1 - share[:, None, None, None]) * x[partner],
                               rtol=1e-5, atol=1e-6)
    # Beta(1, 1): uniform on (0, 1), mean 1/2, variance 1/12
    assert 0 < share.min() and share.max() < 1
    assert share.mean() == pytest.approx(0.5, abs=0.02) and share.var() == pytest.approx(1 / 12, abs=0.005)
    again = mix(x, "flip+mixup", np.random.default_rng(1))
    other = mix(x, "flip+mixup", np.random.default_rng(2))
    assert np.array_equal(again[0], mixed) and not np.array_equal(other[0], mixed)
    # NHWC is mixed like NCHW
    nhwc = mix(x.transpose(0, 2, 3, 1), "mixup", np.random.default_rng(3))[0]
    np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), mix(x, "mixup", np.random.default_rng(3))[0])


def test_cutmix_pastes_a_box_of_the_partner_covering_one_minus_the_share():
    x = np.random.default_rng(0).random((500, 3, 8, 8)).astype(np.float32)
    mixed, partner, share = mix(x, "cutmix", np.random.default_rng(1))
    moved = [i for i in range(len(x)) if partner[i] != i]
    for i in moved:
        pasted = (mixed[i] == x[partner[i]]).all(axis=0) & (mixed[i] != x[i]).any(axis=0)
        kept = (mixed[i] == x[i]).all(axis=0)
        assert (pasted | kept).all()  # every pixel is the image's own or the partner's, in all channels
        rows, cols = np.nonzero(pasted)
        if len(rows):  # one box
            assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 1 - pasted.mean() == pytest.approx(share[i])
    assert share[moved].mean() == pytest.approx(0.5, abs=0.05)


def test_cutout_covers_a_square_of_at_most_half_the_side_with_the_channel_means():
    x = np.random.default_rng(0).random((200, 3, 8, 8)).astype(np.float32) + 1
    out = augment(x, "cutout", np.random.default_rng(1))
    covered = (out != x).any(axis=1)
    assert covered.any(axis=(1, 2)).all()
    for i in range(len(x)):
        rows, cols = np.nonzero(covered[i])
        assert rows.max() - rows.min() < 4 + 1 and cols.max() - cols.min() < 4 + 1
        np.testing.assert_allclose(out[i][:, covered[i]], np.broadcast_to(x[i].mean(axis=(1, 2))[:, None],
                                                                           (3, covered[i].sum())), rtol=1e-5)


def test_a_mixed_image_is_labelled_by_both_labels_by_their_shares():
    teacher = np.full((2, 3), 1 / 3, np.float32)
    target = training_target(teacher, np.array([0, 2]), 0.5, np.array([1, 0]), np.array([0.75, 0.25], np.float32))
    np.testing.assert_allclose(target, [[1 / 6 + 0.375, 1 / 6, 1 / 6 + 0.125], [1 / 6 + 0.375, 1 / 6, 1 / 6 + 0.125]])
    np.testing.assert_allclose(target.sum(1), 1, rtol=1e-6)


def test_the_temperature_softens_the_original_not_the_labels():
    teacher = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]], np.float32)
    np.testing.assert_allclose(training_target(teacher, None, 0.0, temperature=1.0), teacher)
    soft = training_target(teacher, None, 0.0, temperature=2.0)
    expected = np.sqrt(teacher) / np.sqrt(teacher).sum(1, keepdims=True)  # p^(1/2), renormalised
    np.testing.assert_allclose(soft, expected, rtol=1e-5, atol=1e-7)
    mixed = training_target(teacher, np.array([2, 0]), 0.25, temperature=2.0)
    np.testing.assert_allclose(mixed, 0.75 * expected + 0.25 * np.eye(3)[[2, 0]], rtol=1e-5, atol=1e-7)


def test_unknown_augmentation_is_refused(sample):
    original, perforated, _, images, _ = sample
    with pytest.raises(PerforateError, match="augment must be .*'flip\\+blur'"):
        finetune(perforated, original, _data(images, count=20), augment="flip+blur", progress=False)
    with pytest.raises(PerforateError, match="weight_decay"):
        finetune(perforated, original, _data(images, count=20), weight_decay=-0.1, progress=False)
    for bad in (0, -2.0, float("inf"), "4", True):
        with pytest.raises(PerforateError, match="temperature must be a positive number"):
            finetune(perforated, original, _data(images, count=20), temperature=bad, progress=False)


@pytest.mark.parametrize("option", [dict(augment="flip+crop+mixup"), dict(augment="flip+crop+cutmix"),
                                    dict(augment="flip+crop+cutout"), dict(weight_decay=0.5), dict(temperature=1.0)])
def test_each_recovery_option_changes_the_training(sample, option):
    original, perforated, _, images, labels = sample
    common = dict(method="distill", epochs=1, learning_rate=1e-3, progress=False, threads=1, augment="flip+crop",
                  temperature=4.0)
    runs = [finetune(perforated, original, _data(images, labels, 100), **dict(common, **changes))
            for changes in ({}, option)]
    assert all(r.improved for r in runs)
    assert runs[1].settings[next(iter(option))] == next(iter(option.values()))
    assert any(not np.array_equal(runs[0].values[k], runs[1].values[k]) for k in runs[0].values)
    if "weight_decay" in option:  # decay shrinks the weight kernels, not the biases
        norms = [sum(float(np.square(r.values[k]).sum()) for k in r.values if r.values[k].ndim >= 2) for r in runs]
        assert norms[1] < norms[0]
