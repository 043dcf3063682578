"""Tests for onnx_perforate.gradients: dL/dV from the onnx-ad derivative graph run by ORT.

Gradient checks compare ORT's float32 derivative with central finite differences of the
same loss graph evaluated in float64 by the ONNX reference evaluator (ORT has no float64
Conv). Tolerance: |g - fd| <= 1e-3 |fd| + 1e-5 max|g|. The float32 backward pass is
accurate to ~1e-7..1e-5 relative (rounding accumulated over a few dozen ops; measured on
all 26 SqueezeNet convs); the float64 difference quotient with an absolute step of 1e-4
has truncation and rounding errors far below that. The step is not scaled by |V|:
SqueezeNet's activations reach several hundred, and a step of 1e-4 |V| crossed a
downstream ReLU kink there (a 1e-2 error). The 100x margin covers unlucky accumulation
orders without letting a wrong rule (errors of order 1) through; the absolute term keeps
positions with near-zero gradients from failing on rounding alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_perforate.errors import PerforateError
from onnx_perforate.gradients import (
    DEFAULT_LOSS,
    GradientError,
    GradientRunner,
    build_gradient_model,
    default_session_options,
    impact_map,
    prepare_model,
)
from helpers import sample_file, shared_file, synthetic_cnn, synthetic_input, to_double

RTOL, ATOL_FRACTION = 1e-3, 1e-5


# --------------------------------------------------------------------------- helpers

def checkerboard_index(ho, wo):
    """Positions with odd i + j are skipped and copy their left (or right) neighbour."""
    index = np.arange(ho * wo, dtype=np.int64).reshape(ho, wo)
    for i in range(ho):
        for j in range(wo):
            if (i + j) % 2:
                index[i, j] = i * wo + (j - 1 if j else j + 1)
    return index


class Float64Loss:
    """The loss of a GradientModel's forward graph in float64, as a function of a
    perturbation of one tensor V. Only the nodes downstream of V's tap are re-evaluated."""

    def __init__(self, gm, feeds, target, tensor):
        model = to_double(gm.loss_model)
        full = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
        for v in gm.tensors:
            full[gm.taps[v]] = np.zeros(gm.shapes[v])
        if gm.target is not None:
            full[gm.target] = np.asarray(target, np.int64 if gm.target_kind == "labels"
                                         else np.float64)
        cache = ReferenceEvaluator(model).run(None, full, intermediate=True)
        self.loss0 = float(cache[gm.loss])
        self.tap, self.shape = gm.taps[tensor], gm.shapes[tensor]
        live, nodes = {self.tap}, []
        for node in model.graph.node:
            if live & set(node.input):
                nodes.append(node)
                live.update(node.output)
        produced = {o for n in nodes for o in n.output}
        weights = {t.name: t for t in model.graph.initializer}
        needed = {i for n in nodes for i in n.input if i} - produced
        self.feeds = {}
        inputs = [helper.make_tensor_value_info(self.tap, TensorProto.DOUBLE, list(self.shape))]
        for name in sorted(needed - set(weights) - {self.tap}):
            value = np.asarray(cache[name] if name in cache else full[name])
            self.feeds[name] = value
            inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
        graph = helper.make_graph(nodes, "tail", inputs,
                                  [helper.make_tensor_value_info(gm.loss, TensorProto.DOUBLE, [])],
                                  [weights[n] for n in sorted(needed & set(weights))])
        tail = helper.make_model(graph, opset_imports=model.opset_import)
        self.evaluator = ReferenceEvaluator(tail)
        self.loss_name = gm.loss

    def __call__(self, index, delta):
        tap = np.zeros(self.shape)
        tap[index] = delta
        return float(self.evaluator.run([self.loss_name], {**self.feeds, self.tap: tap})[0])

    def derivative(self, index, eps=1e-4):
        return (self(index, eps) - self(index, -eps)) / (2 * eps)


def check_fd(gm, feeds, target, results, tensors, rng, n_largest=3, n_random=2):
    """Central differences at the largest-|grad| positions, a few random nonzero ones and
    one position with a zero gradient; returns the worst relative error seen."""
    worst = 0.0
    for tensor in tensors:
        grad = results[tensor][1]
        loss = Float64Loss(gm, feeds, target, tensor)
        flat = np.abs(grad).reshape(-1)
        picks = list(np.argsort(flat)[-n_largest:])
        nonzero = np.flatnonzero(flat)
        if nonzero.size:
            picks += list(rng.choice(nonzero, min(n_random, nonzero.size), replace=False))
        zero = np.flatnonzero(flat == 0)
        if zero.size:
            picks.append(rng.choice(zero))
        atol = ATOL_FRACTION * flat.max()
        for p in picks:
            index = np.unravel_index(p, grad.shape)
            fd = loss.derivative(index)
            g = float(grad[index])
            assert abs(g - fd) <= RTOL * abs(fd) + atol, (tensor, index, g, fd)
            if fd:
                worst = max(worst, abs(g - fd) / abs(fd))
    return worst


def _labels_of(model, x):
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    return out.reshape(len(x), -1)


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# --------------------------------------------------------------------------- synthetic CNN

@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "softmax"])
@pytest.mark.parametrize("loss", ["nll", "self_nll"])
def test_synthetic_finite_differences(softmax, loss):
    model = synthetic_cnn(softmax=softmax)
    x = synthetic_input(2)
    labels = np.array([1, 3], np.int64)
    runner = GradientRunner(model, ["c1", "c2"], loss=loss)
    gm = runner.gradient_model(2)
    assert gm.scores == ("probabilities" if softmax else "logits")
    target = labels if loss == "nll" else None
    results, value = runner.run({"x": x}, target, return_loss=True)
    # the loss is the sum of the images' own losses
    logp = _log_softmax(_labels_of(synthetic_cnn(softmax=False), x))
    chosen = labels if loss == "nll" else logp.argmax(axis=1)
    assert value == pytest.approx(-logp[np.arange(2), chosen].sum(), rel=1e-5)
    for v in ("c1", "c2"):
        assert results[v][0].shape == results[v][1].shape == gm.shapes[v]
        assert np.abs(results[v][1]).max() > 0
    fd_target = labels if gm.target is not None else None
    check_fd(gm, {"x": x}, fd_target, results, ["c1", "c2"], np.random.default_rng(0))


def test_softmax_output_matches_logits_model():
    """A Softmax head is looked through (LogSoftmax of its input), so the gradients equal
    those of the same network ending in logits -- also at the logits themselves, which are
    the model output in one case and the Softmax input in the other."""
    x = synthetic_input(3)
    taps = ["c1", "c2", "logits"]
    plain = GradientRunner(synthetic_cnn(softmax=False), taps).run({"x": x})
    soft = GradientRunner(synthetic_cnn(softmax=True), taps).run({"x": x})
    for v in taps:
        np.testing.assert_allclose(soft[v][1], plain[v][1], rtol=1e-4,
                                   atol=1e-6 * np.abs(plain[v][1]).max())
    # d(-log softmax(z)[y]) / dz = softmax(z) - onehot(y)
    z = plain["logits"][0].astype(np.float64)
    p = np.exp(_log_softmax(z))
    expected = p - np.eye(5)[p.argmax(axis=1)]
    np.testing.assert_allclose(plain["logits"][1], expected, atol=1e-6)


def test_default_loss_is_self_nll_and_equals_nll_with_own_labels():
    assert DEFAULT_LOSS == "self_nll"
    model = synthetic_cnn()
    x = synthetic_input(3)
    own = _labels_of(model, x).argmax(axis=1)
    a = GradientRunner(model, ["c1"]).run({"x": x})
    b = GradientRunner(model, ["c1"], loss="nll").run({"x": x}, own)
    np.testing.assert_array_equal(a["c1"][1], b["c1"][1])


def test_batch_sum_gives_per_image_gradients():
    model = synthetic_cnn()
    x = synthetic_input(3)
    runner = GradientRunner(model, ["c1", "c2"])
    whole = runner.run({"x": x})
    for i in range(3):
        single = runner.run({"x": x[i:i + 1]})
        for v in ("c1", "c2"):
            np.testing.assert_allclose(single[v][1][0], whole[v][1][i], rtol=1e-5,
                                       atol=1e-7 * np.abs(whole[v][1]).max())
    # impact: per-image maps averaged with equal weights over uneven batches
    impact = runner.impact([{"x": x[:2]}, {"x": x[2:]}])
    for v in ("c1", "c2"):
        expected = impact_map(whole[v][0], whole[v][1])
        assert impact[v].dtype == np.float64 and impact[v].shape == whole[v][0].shape[2:]
        np.testing.assert_allclose(impact[v], expected, rtol=1e-5)


def test_kl_loss():
    model = synthetic_cnn()
    x = synthetic_input(2)
    runner = GradientRunner(model, ["c1", "c2"], loss="kl")
    # at the unperforated network the target is the current distribution: KL = 0, grad = 0
    results, value = runner.run({"x": x}, return_loss=True)
    assert abs(value) < 1e-5
    nll = GradientRunner(model, ["c2"]).run({"x": x})["c2"][1]
    assert np.abs(results["c2"][1]).max() < 1e-4 * np.abs(nll).max()
    # against another distribution it is a proper loss: check it by finite differences
    target = np.random.default_rng(3).dirichlet(np.ones(5), 2).astype(np.float32)
    target[0, 2] = 0.0  # a zero class must contribute 0, not 0 * log 0
    target[0] /= target[0].sum()
    results, value = runner.run({"x": x}, target, return_loss=True)
    logp = _log_softmax(_labels_of(model, x))
    q = target.astype(np.float64)
    expected = np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - logp), 0))
    assert value == pytest.approx(expected, rel=1e-4)
    check_fd(runner.gradient_model(2), {"x": x}, target, results, ["c1", "c2"],
             np.random.default_rng(1))


def test_kl_loss_at_a_temperature():
    """temperature=T (distillation): the KL of both distributions softened by T, times T^2 -- its value
    against numpy in float64, its gradients against finite differences; any other loss, or a temperature
    that is not a positive number, is refused."""
    import onnxruntime as ort

    model = synthetic_cnn()
    x = synthetic_input(2)
    gm = build_gradient_model(model, ["c1", "c2"], 2, loss="kl", temperature=3.0)
    target = np.random.default_rng(4).dirichlet(np.ones(5), 2).astype(np.float32)  # a softened target
    session = ort.InferenceSession(gm.model.SerializeToString(), default_session_options(),
                                   providers=["CPUExecutionProvider"])
    names = [gm.loss] + [gm.values[v] for v in gm.tensors] + [gm.grads[v] for v in gm.tensors]
    out = session.run(names, {"x": x, gm.target: target})
    soft = _log_softmax(_log_softmax(_labels_of(model, x)) / 3.0)
    q = target.astype(np.float64)
    assert out[0] == pytest.approx(9.0 * np.sum(q * (np.log(q) - soft)), rel=1e-4)
    results = {v: (out[1 + i], out[3 + i]) for i, v in enumerate(gm.tensors)}
    check_fd(gm, {"x": x}, target, results, ["c1", "c2"], np.random.default_rng(2))
    with pytest.raises(GradientError, match="temperature softens the target distribution of loss 'kl'"):
        build_gradient_model(model, ["c1"], 1, loss="nll", temperature=2.0)
    for bad in (0.0, -1.0, float("nan"), "2", True):
        with pytest.raises(GradientError, match="temperature must be a positive number"):
            build_gradient_model(model, ["c1"], 1, loss="kl", temperature=bad)


def test_target_errors():
    """Every bad request is a GradientError, a PerforateError (one line in the CLI, no traceback)."""
    model = synthetic_cnn()
    x = synthetic_input(1)
    with pytest.raises(GradientError, match="labels"):
        GradientRunner(model, ["c1"], loss="nll").run({"x": x})
    with pytest.raises(GradientError, match="self_nll"):
        GradientRunner(model, ["c1"]).run({"x": x}, np.array([0]))
    with pytest.raises(GradientError, match="loss must be"):
        build_gradient_model(model, ["c1"], 1, loss="mse")
    with pytest.raises(PerforateError, match="not a tensor"):
        build_gradient_model(model, ["nope"], 1)


def test_gradient_sessions_take_the_package_options_without_the_library():
    options = default_session_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert default_session_options().intra_op_num_threads == 0  # ORT's default, not a fixed count


# --------------------------------------------------------------------------- perforation

@pytest.mark.parametrize("loss", ["nll", "self_nll", "kl"])
def test_interpolation(loss):
    model = synthetic_cnn()
    x = synthetic_input(2)
    labels = np.array([0, 4], np.int64)
    index = checkerboard_index(12, 12)
    skipped = index.reshape(-1) != np.arange(144)
    runner = GradientRunner(model, ["c1", "c2"], loss=loss, interpolation={"c1": index})
    gm = runner.gradient_model(2)
    target = labels if loss == "nll" else None
    results, value = runner.run({"x": x}, target, return_loss=True)
    grad = results["c1"][1].reshape(2, 8, 144)
    assert np.all(grad[:, :, skipped] == 0.0)          # exactly zero, not just small
    assert np.abs(grad[:, :, ~skipped]).max() > 0
    if loss == "kl":
        assert value > 0  # the perforated net departs from the original distribution
    # the graph's own target (labels of the original model for self_nll, its distribution
    # for kl) is what the float64 check must use too
    fd_target = runner.resolve_target({"x": x}, target)
    check_fd(gm, {"x": x}, fd_target, results, ["c1", "c2"], np.random.default_rng(2))


def test_interpolation_self_nll_uses_original_labels():
    """With a perforated graph, self_nll's labels are the *original* model's top-1; the
    perforated tensor need not be one of the differentiated ones."""
    model = synthetic_cnn()
    x = synthetic_input(4)
    own = _labels_of(model, x).argmax(axis=1)
    perforation = {"c1": checkerboard_index(12, 12)}
    a = GradientRunner(model, ["c2"], interpolation=perforation).run({"x": x})
    b = GradientRunner(model, ["c2"], loss="nll", interpolation=perforation).run({"x": x}, own)
    np.testing.assert_array_equal(a["c2"][1], b["c2"][1])
    plain = GradientRunner(model, ["c2"]).run({"x": x})
    assert not np.allclose(a["c2"][1], plain["c2"][1])  # the perforation is in effect


def test_interpolation_index_validation():
    model = synthetic_cnn()
    bad = np.arange(144, dtype=np.int64).reshape(12, 12)
    bad[0, 1], bad[0, 2] = 2, 1  # 1 copies 2, which itself copies 1: no computed source
    with pytest.raises(ValueError, match="not computed"):
        build_gradient_model(model, ["c1"], 1, interpolation={"c1": bad})
    with pytest.raises(ValueError, match="shape"):
        build_gradient_model(model, ["c1"], 1, interpolation={"c1": np.zeros((6, 6), int)})


# --------------------------------------------------------------------------- unsupported ops

def test_unsupported_op_lists_every_node():
    """MaxRoiPool has no reverse rule in onnx-ad (and no spec function body)."""
    model = synthetic_cnn()
    graph = model.graph
    rois = numpy_helper.from_array(np.array([[0, 0, 0, 5, 5]], np.float32), "rois")
    graph.initializer.append(rois)
    nodes = list(graph.node)
    k = next(i for i, n in enumerate(nodes) if n.op_type == "GlobalAveragePool")
    nodes[k:k + 1] = [
        helper.make_node("MaxRoiPool", ["r2", "rois"], ["roi_a"], pooled_shape=[2, 2],
                         name="roi_a"),
        helper.make_node("MaxRoiPool", ["r2", "rois"], ["roi_b"], pooled_shape=[1, 1],
                         name="roi_b"),
        helper.make_node("ReduceMax", ["roi_a"], ["roi_a_max"], axes=[2, 3], keepdims=1),
        helper.make_node("Add", ["roi_a_max", "roi_b"], ["gap"]),
    ]
    # ReduceMax takes axes as an input from opset 18; stay at 17 with the attribute
    graph.ClearField("node")
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    with pytest.raises(GradientError) as info:
        build_gradient_model(model, ["c1"], 1)
    message = str(info.value)
    assert "MaxRoiPool 'roi_a'" in message and "MaxRoiPool 'roi_b'" in message
    assert isinstance(info.value, ValueError)
    # a tap after the unsupported ops does not need them
    build_gradient_model(model, ["roi_a_max"], 1)


# --------------------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def cifar():
    model = shared_file("data", "cifar10", "cifar10_keras_cnn.onnx")
    with np.load(shared_file("data", "cifar10", "cifar10_test.npz")) as data:
        images = data["images"][:4].transpose(0, 3, 1, 2).astype(np.float32)
        labels = data["labels"][:4].astype(np.int64)
    return onnx.load(model), images, labels


@pytest.mark.shared
def test_cifar_finite_differences(cifar):
    model, images, labels = cifar
    convs = [n.output[0] for n in prepare_model(model).graph.node if n.op_type == "Conv"]
    assert len(convs) == 6
    runner = GradientRunner(model, convs, loss="nll")
    gm = runner.gradient_model(2)
    assert gm.scores == "logits"  # the model ends in Relu -> Identity, no Softmax
    x = images[:2]
    results = runner.run({gm.inputs[0]: x}, labels[:2])
    worst = check_fd(gm, {gm.inputs[0]: x}, labels[:2], results, [convs[0], convs[-1]],
                     np.random.default_rng(4))
    assert worst < RTOL


@pytest.mark.shared
def test_cifar_impact_and_interpolation(cifar):
    model, images, labels = cifar
    runner = GradientRunner(model, ["conv2d_1"])
    impact = runner.impact([{"input": images[:2]}, {"input": images[2:]}])["conv2d_1"]
    assert impact.shape == (28, 28) and np.all(impact >= 0) and impact.max() > 0
    index = checkerboard_index(28, 28)
    perforated = GradientRunner(model, ["conv2d_1"], interpolation={"conv2d_1": index})
    grad = perforated.run({"input": images[:2]})["conv2d_1"][1]
    skipped = (index.reshape(-1) != np.arange(28 * 28)).reshape(28, 28)
    assert np.all(grad[:, :, skipped] == 0) and np.abs(grad).max() > 0


@pytest.mark.shared
def test_squeezenet():
    squeezenet = shared_file("data", "imagenet", "squeezenet1.1.onnx")
    model = onnx.load(squeezenet)  # opset 7, weights listed as inputs, Softmax output
    taps = ["fire9/expand1x1_1", "conv10_1"]
    gm = build_gradient_model(model, taps, 1)
    assert gm.inputs == ("data_0",) and gm.scores == "probabilities"
    onnx.checker.check_model(gm.model)
    assert [i.name for i in gm.model.graph.input] == ["data_0"]
    assert [o.name for o in gm.model.graph.output] == [
        gm.loss, *(gm.values[v] for v in taps), *(gm.grads[v] for v in taps)]
    assert gm.grads["conv10_1"] == "conv10_1__grad"
    runner = GradientRunner(squeezenet, taps)
    x = np.random.default_rng(5).uniform(0, 255, (1, 3, 224, 224)).astype(np.float32)
    results = runner.run({"data_0": x})
    worst = check_fd(runner.gradient_model(1), {"data_0": x}, None, results, taps,
                     np.random.default_rng(6), n_largest=2, n_random=1)
    assert worst < RTOL


# --------------------------------------------------------------------------- bundled sample model

def test_sample_model_finite_differences():
    """The bundled Fashion-MNIST CNN (Conv -> BatchNormalization -> Relu, opset 17): dL/dV of its
    first and last conv against float64 central differences, within RTOL (relative) plus
    ATOL_FRACTION of the largest gradient."""
    model = onnx.load(sample_file("fashion_cnn.onnx"))
    with np.load(sample_file("fashion_mnist_subset.npz")) as data:
        x = data["images"][::250][:2].astype(np.float32)  # two images of different classes
        labels = data["labels"][::250][:2].astype(np.int64)
    convs = [n.output[0] for n in prepare_model(model).graph.node if n.op_type == "Conv"]
    runner = GradientRunner(model, [convs[0], convs[-1]], loss="nll")
    gm = runner.gradient_model(2)
    results = runner.run({gm.inputs[0]: x}, labels)
    worst = check_fd(gm, {gm.inputs[0]: x}, labels, results, [convs[0], convs[-1]], np.random.default_rng(5))
    assert worst < RTOL
