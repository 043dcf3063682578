"""Recovering the accuracy a perforated network lost (Figurnov et al. 2016 fine-tune after perforating).

Three methods, all measured on a held-out part of the data the method never trained on:

- ``"distill"`` (the main one): the perforated network learns to reproduce the original network's
  output distribution (KL divergence of both distributions softened by a temperature, 4 by default;
  mixed with the labels' NLL when labels are given) on the
  calibration images, augmented by flips and shifted crops (optionally cutout, and mixup or cutmix of two
  images, which the original labels). Gradients with respect to the weights come
  from an onnx-ad derivative graph run by ONNX Runtime (:mod:`onnx_perforate.gradients`), in which the
  perforation is written with standard ops: the full Conv, then a Gather that copies every skipped
  position from its nearest computed one. That network computes exactly what the deployed
  PerforatedConv + NNInterpolate model computes (BatchNorm folding, activation fusion and compact
  tensors only reorder position-wise work), so training it trains the deployed network. Adam, a cosine
  learning-rate schedule after a short warm-up, early stopping on the held-out loss.
- ``"bias_correction"``: per perforated Conv, in network order, shift each output channel's bias so
  that its mean over the calibration images equals the original network's (the Conv's own bias, or the
  shift of the BatchNormalization right after it).
- ``"bn_reestimation"``: recompute every BatchNormalization's running mean and variance on the
  perforated network's activations.

The trained values live in the original model's initializers; :func:`finetune` rewrites that model with
the perforated model's masks and copies the new values into the perforated model's initializers by
name (folded BatchNorms included), then checks that the result computes what the rewrite computes. The
returned model is never worse on the held-out images than the input: when nothing improved the held-out
loss, the input comes back unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import runtime
from ._library import DOMAIN
from .analysis import AnalysedModel
from .calibration import CalibrationSet, calibration_set
from .errors import PerforateError
from .gradients import GradientError, build_gradient_model, prepare_model
from .graph import atomic_outputs, consumers, find_node, load_model, node_key, producer_nodes
from .impact import interpolation_index
from .inspection import inspect
from .rewrite import rewrite

log = logging.getLogger(__name__)

METHODS = ("distill", "bias_correction", "bn_reestimation")
PARAMETERS = ("all", "perforated", "biases")
# Augmentation parts, joined by "+" (e.g. "flip+crop+mixup"); "auto" and "none" stand alone. Geometric
# parts act per image; the mixing parts (mixup, cutmix) blend each image with another of the batch and
# the original labels the blend, which multiplies the images a few-image distillation sees.
AUGMENTATION_PARTS = ("flip", "crop", "cutout", "mixup", "cutmix")
# The share of an image in its blend is drawn from Beta(MIX_ALPHA, MIX_ALPHA): 1 is uniform on [0, 1].
MIX_ALPHA = 1.0

# Defaults measured on the bundled Fashion-MNIST CNN and the CIFAR-10 CNN (docs/results.md, "Choosing
# the recovery recipe"): 30 epochs at a peak learning rate of 1e-3, the original's distribution alone as
# the target (mixing in the labels did not help held-out accuracy on either), flips and crops.
# The distillation temperature (Hinton et al.: both distributions softened by it) chosen by measurement
# too (docs/results.md, "The distillation temperature").
DEFAULTS = dict(method="auto", parameters="all", epochs=30, batch_size=32, learning_rate=1e-3,
                label_weight=0.0, holdout=0.2, patience=10, augment="auto", seed=0, lr_backoff=True,
                weight_decay=0.0, temperature=4.0)

# How often the learning-rate back-off may restart the distillation (1e-3 -> 1e-4 -> 1e-5 by default).
MAX_BACKOFFS = 2

# Ops whose float inputs after the first are trainable parameters (input positions).
_PARAMETER_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}
_BIAS_INPUTS = {"Conv": (2,), "Gemm": (2,), "BatchNormalization": (1, 2)}
_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass
class FinetuneResult:
    """The recovered perforated model, the held-out numbers before and after, and the history per epoch."""

    model: onnx.ModelProto
    method: str
    history: list = field(default_factory=list)  # one dict per evaluation (epoch 0: the input model)
    before: dict = field(default_factory=dict)  # held-out loss / agreement / top-1 of the input model
    after: dict = field(default_factory=dict)  # the same for the returned model
    improved: bool = False  # False: the input model came back unchanged
    settings: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)  # {initializer of the original: the value it now has}

    def to_dict(self) -> dict:
        return {"method": self.method, "improved": self.improved, "before": self.before, "after": self.after,
                "history": self.history, "settings": self.settings}

    def summary(self) -> str:
        def fmt(metrics):
            parts = [f"loss {metrics['loss']:.4f}", f"agreement {metrics['agreement']:.3f}"]
            if metrics.get("top1") is not None:
                parts.append(f"top-1 {metrics['top1']:.3f}")
            return ", ".join(parts)

        held = self.settings.get("holdout_images", 0)
        head = f"{self.method}: held-out {held} images: {fmt(self.before)} -> {fmt(self.after)}"
        if not self.improved:
            head += " (no improvement: the input model is returned)"
        return head


# ------------------------------------------------------------------------------------------------
# Which perforation, which parameters


def perforation_masks(perforated: onnx.ModelProto, original: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{Conv key of ``original``: bool mask} read from the PerforatedConv nodes of ``perforated``: the
    masks that rewriting ``original`` needs to give ``perforated`` again."""
    constants = {t.name: t for t in perforated.graph.initializer}
    producers = producer_nodes(perforated)
    shapes = None
    masks = {}
    for node in perforated.graph.node:
        if node.domain != DOMAIN or node.op_type != "PerforatedConv":
            continue
        key = node.name
        target = find_node(original, key)
        if target is None or target.op_type != "Conv":
            raise PerforateError(f"the perforated model does not match the original: PerforatedConv {key!r} has no "
                                 "Conv of that name in the original model")
        mask_name = node.input[3] if len(node.input) > 3 else ""
        if mask_name not in constants:
            raise PerforateError(f"PerforatedConv {key!r}: its mask {mask_name!r} is not an initializer")
        mask = numpy_helper.to_array(constants[mask_name]).astype(bool)
        on_compact = (len(node.input) > 4 and node.input[4]) or _is_view(node.input[0], producers)
        if mask.all() and on_compact:
            # A Conv the compact rewrite runs on a compact input: a 1x1 Conv on the [N, C, 1, K] view,
            # or a spatial one reading X_index. It computes its input's positions; those are a mask of
            # their own only when a CompactPool pooled just them for this Conv (Y_positions).
            if shapes is None:
                shapes = {r.name: tuple(r.output_shape[2:]) for r in inspect(original)}
            positions = _pooled_positions(node.input[0], producers, constants)
            if positions is None:
                continue
            mask = np.zeros(shapes[node_key(target)], bool)
            mask.reshape(-1)[positions] = True
        masks[node_key(target)] = mask
    if not masks:
        raise PerforateError("the perforated model has no PerforatedConv node: nothing to recover")
    return masks


def _is_view(tensor: str, producers) -> bool:
    """Whether ``tensor`` is the [N, C, 1, K] Reshape view the compact rewrite gives a 1x1 Conv."""
    node = producers.get(tensor)
    return node is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and \
        producers.get(node.input[0]) is not None and producers[node.input[0]].domain == DOMAIN


def _pooled_positions(tensor: str, producers, constants) -> np.ndarray | None:
    """The Y_positions of the CompactPool whose compact output ``tensor`` is (through the Reshape view
    of a 1x1 Conv), or None when it comes from elsewhere."""
    node = producers.get(tensor)
    if node is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
        node = producers.get(node.input[0])
    if node is None or node.domain != DOMAIN or node.op_type != "CompactPool" or len(node.input) < 3 \
            or node.input[2] not in constants:
        return None
    return numpy_helper.to_array(constants[node.input[2]]).astype(np.int64).reshape(-1)


def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def trainable_parameters(original: onnx.ModelProto, choice: str, perforated: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the float initializers that train: ``"all"`` (every Conv/Gemm/MatMul weight and bias and
    BatchNormalization scale and shift), ``"perforated"`` (those of the perforated Convs, the
    BatchNormalizations after them and the next layers reading them) or ``"biases"`` (biases and
    BatchNormalization scale and shift only)."""
    if choice not in PARAMETERS:
        raise PerforateError(f"parameters must be one of {PARAMETERS}, got {choice!r}")
    constants = _initializers(original)
    table = _BIAS_INPUTS if choice == "biases" else _PARAMETER_INPUTS
    nodes = list(original.graph.node)
    if choice == "perforated":
        readers = consumers(original)
        chosen, seen = set(), set()
        for node in nodes:
            if node_key(node) not in perforated:
                continue
            chosen.add(id(node))
            stack = list(node.output)
            while stack:  # to the next parametrised layer along every path
                for reader in readers.get(stack.pop(), []):
                    if id(reader) in seen:
                        continue
                    seen.add(id(reader))
                    chosen.add(id(reader))
                    if reader.op_type not in _LAYERS:
                        stack.extend(reader.output)
        nodes = [n for n in nodes if id(n) in chosen]
    names = []
    for node in nodes:
        for position in table.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in constants:
                tensor = constants[node.input[position]]
                if tensor.data_type == onnx.TensorProto.FLOAT and node.input[position] not in names:
                    names.append(node.input[position])
    if not names:
        raise PerforateError(f"no trainable float initializer for parameters={choice!r}")
    return names


# ------------------------------------------------------------------------------------------------
# The perforated network with standard ops, its parameters as graph inputs


def _parameters_as_inputs(model: onnx.ModelProto, names) -> dict[str, str]:
    """Make each initializer in ``names`` a graph input under its own name (in place); returns
    {parameter: input name}. onnx-ad folds an Identity of a constant into a Constant node: such a node
    producing ``name + PARAM_SUFFIX`` becomes the input instead."""
    graph = model.graph
    producers = producer_nodes(model)
    feeds = {}
    constants = _initializers(model)
    drop_nodes = []
    for name in names:
        alias = name + _PARAM_SUFFIX
        node = producers.get(alias)
        if node is not None and node.op_type == "Constant":
            drop_nodes.append(node)
            source = numpy_helper.to_array(node.attribute[0].t)
            graph.input.append(helper.make_tensor_value_info(alias, onnx.TensorProto.FLOAT, list(source.shape)))
            feeds[name] = alias
        elif name in constants:
            tensor = constants[name]
            graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            feeds[name] = name
        else:
            raise GradientError(f"parameter {name!r} is neither an initializer nor folded into a Constant")
    kept = [t for t in graph.initializer if t.name not in set(feeds.values())]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    for node in drop_nodes:
        graph.node.remove(node)
    return feeds


_PARAM_SUFFIX = "__trainable"


class PerforatedTrainer:
    """The perforated network as a trainable ONNX graph run by ONNX Runtime.

    ``loss_and_gradients(x, target)`` returns the KL loss (at ``temperature``: ``target`` comes softened
    by it, see :func:`soften`) summed over the batch and dL/dW for every
    trainable W; ``forward(x, outputs)`` evaluates the same network (and any intermediate tensors of the
    original model, read after the perforation). The batch size is fixed (the derivative needs static
    shapes): pass exactly ``batch_size`` images.
    """

    def __init__(self, original, masks: Mapping[str, np.ndarray], parameters, *, batch_size: int,
                 threads: int | None = None, temperature: float = 1.0):
        original = load_model(original)
        self.batch_size = int(batch_size)
        self.parameters = list(parameters)
        constants = _initializers(original)
        self.values = {name: numpy_helper.to_array(constants[name]).astype(np.float32).copy()
                       for name in self.parameters}
        model = onnx.ModelProto()
        model.CopyFrom(original)
        # an Identity per parameter gives onnx-ad a computed tensor to differentiate
        renamed = {name: name + _PARAM_SUFFIX for name in self.parameters}
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
        identities = [helper.make_node("Identity", [name], [alias]) for name, alias in renamed.items()]
        nodes = identities + list(model.graph.node)
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
        outputs = {node_key(n): n.output[0] for n in original.graph.node if n.op_type == "Conv"}
        self.interpolation = {outputs[key]: interpolation_index(mask) for key, mask in masks.items()
                              if not np.asarray(mask, bool).all()}
        gm = build_gradient_model(model, list(renamed.values()), self.batch_size, loss="kl",
                                  interpolation=self.interpolation, temperature=temperature)
        self.gradient_model = gm
        self.input_name = gm.inputs[0]
        self.scores = gm.scores
        self.output = next(o.name for o in original.graph.output)
        self.feed_names = _parameters_as_inputs(gm.model, self.parameters)
        self.grad_names = [gm.grads[renamed[name]] for name in self.parameters]
        # the forward graph, for evaluation: taps fed with zeros
        self.forward_model = onnx.ModelProto()
        self.forward_model.CopyFrom(gm.loss_model)
        self.forward_feeds = _parameters_as_inputs(self.forward_model, self.parameters)
        self.zero_taps = {gm.taps[v]: np.zeros(gm.shapes[v], np.float32) for v in gm.tensors}
        self.threads = threads
        self.session = self._session(gm.model)
        self._forward_sessions = {}

    def _session(self, model):
        return runtime.session(model, self.threads or None, custom_ops=False, allow_spinning=None, quiet=True)

    def loss_and_gradients(self, x, target) -> tuple[float, dict]:
        feeds = {self.input_name: x, self.gradient_model.target: target}
        feeds.update({self.feed_names[k]: v for k, v in self.values.items()})
        results = self.session.run([self.gradient_model.loss] + self.grad_names, feeds)
        return float(results[0]), dict(zip(self.parameters, results[1:]))

    def forward(self, x, target, extra=()) -> dict:
        """{name: value} for the loss and ``extra`` tensors (names of the original model's tensors; a
        perforated Conv's output is read after its interpolation, as the network's consumers read it)."""
        extra = tuple(extra)
        if extra not in self._forward_sessions:
            model = onnx.ModelProto()
            model.CopyFrom(self.forward_model)
            produced = {o for n in model.graph.node for o in n.output}
            names = [name + "__perforated" if name + "__perforated" in produced else name for name in extra]
            for name in names:
                model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            self._forward_sessions[extra] = (self._session(model), names)
        session, names = self._forward_sessions[extra]
        feeds = {self.input_name: x, self.gradient_model.target: target, **self.zero_taps}
        feeds.update({self.forward_feeds[k]: v for k, v in self.values.items()})
        results = session.run([self.gradient_model.loss] + names, feeds)
        out = {"loss": float(results[0])}
        out.update(zip(extra, results[1:]))
        return out

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """The model output as class probabilities [N, K], read the way the loss reads it."""
        x = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
        if self.scores == "probabilities":
            return np.clip(x, 0.0, None)
        if self.scores == "log_probabilities":
            return np.exp(x)
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return x / x.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Data: targets from the original network, augmentation, held-out evaluation


class _Teacher:
    """The original network's probabilities for any batch (symbolic batch, plain ORT)."""

    def __init__(self, original, trainer: PerforatedTrainer):
        model = prepare_model(original)
        self.output = next(o.name for o in model.graph.output)
        self.input_name = trainer.input_name
        self.trainer = trainer
        self.session = trainer._session(model)

    def __call__(self, x) -> np.ndarray:
        return self.trainer.probabilities(self.session.run([self.output], {self.input_name: x})[0])


def image_layout(shape) -> str | None:
    """"NCHW" or "NHWC" for a 4-D image input with 1 or 3 channels, else None (no augmentation)."""
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3) and shape[2] > 1 and shape[3] > 1:
        return "NCHW"
    if shape[3] in (1, 3) and shape[1] > 1 and shape[2] > 1:
        return "NHWC"
    return None


def augmentation_parts(kind: str) -> tuple[str, ...]:
    """The parts of an ``augment`` setting ("none": none; "auto" is resolved by :func:`finetune`), or a
    PerforateError naming the unknown part."""
    if kind == "none":
        return ()
    parts = tuple(str(kind).split("+"))
    unknown = [p for p in parts if p not in AUGMENTATION_PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise PerforateError(f"augment must be 'auto', 'none' or parts of {AUGMENTATION_PARTS} joined by '+' "
                             f"(each once), got {kind!r}")
    return parts


def augment(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The geometric parts of ``kind`` on an image batch: random horizontal flips, shifted crops (edge
    padding of 1/8 of the size), cutout (a square of half the size, filled with the image's channel
    means, at a random centre; it may reach past the border). The mixing parts are :func:`mix`'s."""
    parts = augmentation_parts(kind)
    layout = image_layout(x.shape)
    if not parts or layout is None:
        return x
    if layout == "NHWC":
        return augment(x.transpose(0, 3, 1, 2), kind, rng).transpose(0, 2, 3, 1).copy()
    x = x.copy()
    h, w = x.shape[2:]
    if "flip" in parts:
        flip = rng.random(len(x)) < 0.5
        x[flip] = x[flip][..., ::-1]
    if "crop" in parts:
        ph, pw = max(1, h // 8), max(1, w // 8)
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="edge")
        dy = rng.integers(0, 2 * ph + 1, len(x))
        dx = rng.integers(0, 2 * pw + 1, len(x))
        for i in range(len(x)):
            x[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    if "cutout" in parts:
        means = x.mean(axis=(2, 3))
        cy, cx = rng.integers(0, h, len(x)), rng.integers(0, w, len(x))
        for i in range(len(x)):
            top, left = max(0, cy[i] - h // 4), max(0, cx[i] - w // 4)
            x[i, :, top:cy[i] + h // 4, left:cx[i] + w // 4] = means[i][:, None, None]
    return x


def mix(x: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mixing part of ``kind`` on an image batch: (mixed batch, partner index, share). Image ``i``
    becomes a blend of itself (``share[i]``) and image ``partner[i]`` of the batch (a random
    permutation): ``mixup`` blends the pixels, ``cutmix`` pastes a box of the partner covering
    ``1 - share`` of the image. The share is drawn from Beta(MIX_ALPHA, MIX_ALPHA) per image; with both
    parts, each batch takes one of them at random. Without a mixing part (or for a non-image input):
    the batch unchanged, partner = itself, share 1."""
    modes = [p for p in augmentation_parts(kind) if p in ("mixup", "cutmix")]
    layout = image_layout(x.shape)
    n = len(x)
    if not modes or layout is None or n < 2:
        return x, np.arange(n), np.ones(n, np.float32)
    if layout == "NHWC":
        mixed, partner, share = mix(x.transpose(0, 3, 1, 2), kind, rng)
        return mixed.transpose(0, 2, 3, 1).copy(), partner, share
    mode = modes[int(rng.integers(len(modes)))]
    partner = rng.permutation(n)
    share = rng.beta(MIX_ALPHA, MIX_ALPHA, n)
    if mode == "mixup":
        weight = share.astype(np.float32)[:, None, None, None]
        return (weight * x + (1 - weight) * x[partner]).astype(x.dtype), partner, share.astype(np.float32)
    h, w = x.shape[2:]
    mixed = x.copy()
    for i in range(n):  # a box of about (1 - share) of the area, of the image's aspect, at a random place
        bh, bw = (int(round(side * math.sqrt(1 - share[i]))) for side in (h, w))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mixed[i, :, top:top + bh, left:left + bw] = x[partner[i], :, top:top + bh, left:left + bw]
        share[i] = 1 - bh * bw / (h * w)  # the share the pixels really have
    return mixed, partner, share.astype(np.float32)


def _batches(n, batch_size, order):
    """Index arrays of exactly ``batch_size`` (the last one wraps around to the start of ``order``)."""
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < batch_size:  # np.resize repeats ``order`` as often as needed: it may be shorter still
            idx = np.concatenate([idx, np.resize(order, batch_size - len(idx))])
        yield idx, min(batch_size, n - start)


def soften(probs, temperature):
    """``probs`` [N, K] at a temperature: p^(1/T), renormalised per row (1: unchanged)."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-30, None)) / temperature
    soft = np.exp(logits - logits.max(axis=1, keepdims=True))
    return soft / soft.sum(axis=1, keepdims=True)


def training_target(teacher_probs, labels, label_weight, partner=None, share=None, temperature=1.0):
    """The target distribution: the original's on the (augmented, mixed) images, softened by the
    distillation ``temperature``, with ``label_weight`` of it the labels (never softened); a mixed image's
    label is its two images' labels weighted by their shares."""
    teacher_probs = soften(teacher_probs, temperature)
    if labels is None or not label_weight:
        return teacher_probs.astype(np.float32)
    rows = np.arange(len(labels))
    onehot = np.zeros_like(teacher_probs)
    if partner is None:
        onehot[rows, labels] = 1.0
    else:
        np.add.at(onehot, (rows, labels), share)
        np.add.at(onehot, (rows, labels[partner]), 1 - share)
    return ((1 - label_weight) * teacher_probs + label_weight * onehot).astype(np.float32)


class _Evaluator:
    """Held-out loss, agreement with the original and top-1, no augmentation. The loss, which early
    stopping and the never-worse check read, is the KL divergence from the original's distribution
    whatever the labels' weight in training: on the few images held out it is a much steadier
    criterion than the labels' NLL (measured in docs/results.md); ``label_loss`` is that NLL."""

    def __init__(self, trainer: PerforatedTrainer, teacher: _Teacher, data: CalibrationSet):
        self.trainer, self.data = trainer, data
        self.teacher = np.concatenate([teacher(x) for x in _chunks(data.inputs, 64)])

    def __call__(self) -> dict:
        trainer, data = self.trainer, self.data
        n = len(data)
        total, nll, agree, correct = 0.0, 0.0, 0, 0
        for idx, count in _batches(n, trainer.batch_size, np.arange(n)):
            target = self.teacher[idx].astype(np.float32)
            out = trainer.forward(data.inputs[idx], target, extra=(trainer.output,))
            probs = trainer.probabilities(out[trainer.output])[:count]
            log_probs = np.log(np.clip(probs, 1e-30, None))
            # per image, so that the images a short last batch repeats are not counted twice
            t = target[:count].astype(np.float64)
            total += float((t * (np.log(np.where(t > 0, t, 1.0)) - log_probs)).sum())
            agree += int((probs.argmax(1) == self.teacher[idx][:count].argmax(1)).sum())
            if data.labels is not None:
                labels = data.labels[idx][:count]
                correct += int((probs.argmax(1) == labels).sum())
                nll -= float(log_probs[np.arange(count), labels].sum())
        labelled = data.labels is not None
        return {"loss": total / n, "agreement": agree / n, "top1": correct / n if labelled else None,
                "label_loss": nll / n if labelled else None}


def _chunks(x, size):
    for start in range(0, len(x), size):
        yield x[start:start + size]


# ------------------------------------------------------------------------------------------------
# Writing the trained values into the perforated model


def with_values(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` hold those arrays (float32)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(values[tensor.name], np.float32), tensor.name))
    return result


def _outputs(model, x, threads):
    from .fallback import session

    runner = session(model, threads)
    first = runner.get_inputs()[0]
    step = first.shape[0] if isinstance(first.shape[0], int) and first.shape[0] > 0 else len(x)
    return np.concatenate([runner.run(None, {first.name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def _difference(a, b) -> float:
    """max |a - b| relative to the largest |b| (1 when b is all zeros)."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(float(np.abs(b).max()), 1e-12))


def check_matches(perforated, original, masks, x, threads=None, tolerance: float = 1e-3) -> None:
    """Raise PerforateError unless ``perforated`` computes what ``original`` rewritten with ``masks`` does."""
    rebuilt = rewrite(original, masks)
    gap = _difference(_outputs(perforated, x, threads), _outputs(rebuilt, x, threads))
    if not gap <= tolerance:
        raise PerforateError(
            f"the perforated model does not match the original: rewriting the original with the perforated "
            f"model's {len(masks)} masks gives outputs that differ by {gap:.3g} (relative to the largest "
            f"output; expected <= {tolerance:g}); was it made from another model or modified since? (A model that "
            "carries recovered values, e.g. from tune's step recovery, needs them as start=TuneResult.values)")


def apply_parameters(perforated, original, masks, values: Mapping[str, np.ndarray], x, threads=None,
                     tolerance: float = 1e-3) -> onnx.ModelProto:
    """The perforated model with ``values`` ({initializer of the original: array}) written in: the
    original with the new values is rewritten with the same masks, and every initializer of the
    perforated model that rewrite produces (folded BatchNorm weights included) takes the new value. The
    result is checked against the rewrite on ``x``; if the perforated model was made with other rewrite
    options and does not match, the rewrite itself is returned."""
    rebuilt = rewrite(with_values(original, values), masks)
    fresh = _initializers(rebuilt)
    result = onnx.ModelProto()
    result.CopyFrom(perforated)
    for tensor in result.graph.initializer:
        new = fresh.get(tensor.name)
        if new is not None and tuple(new.dims) == tuple(tensor.dims) and new.data_type == tensor.data_type:
            tensor.CopyFrom(new)
    expected = _outputs(rebuilt, x, threads)
    gap = _difference(_outputs(result, x, threads), expected)
    if gap > tolerance:
        log.warning("the perforated model's initializers do not map onto the rewrite (outputs differ by %.3g); "
                    "returning the rewritten model instead", gap)
        return rebuilt
    return result


# ------------------------------------------------------------------------------------------------
# The methods


def _cosine(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _bias_targets(original, masks):
    """Per perforated Conv (network order): (key, output tensor, where a per-channel shift goes)."""
    readers = consumers(original)
    constants = _initializers(original)
    found = []
    for node in original.graph.node:
        key = node_key(node)
        if node.op_type != "Conv" or key not in masks or np.asarray(masks[key]).all():
            continue
        if len(node.input) > 2 and node.input[2] in constants:
            found.append((key, node.output[0], ("bias", node.input[2])))
            continue
        users = readers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "BatchNormalization" and \
                all(name in constants for name in users[0].input[1:5]):
            found.append((key, node.output[0], ("batchnorm", users[0])))
        else:
            log.info("bias correction: Conv %r has no bias and no BatchNormalization after it; skipped", key)
    return found


def method_applies(method: str, original: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> bool:
    """Whether the training-free ``method`` has anything to change for ``masks``: bias correction needs a
    perforated Conv with a bias or a BatchNormalization after it, BN re-estimation a BatchNormalization
    with constant statistics; distillation always applies."""
    if method == "bias_correction":
        return bool(_bias_targets(original, masks))
    if method == "bn_reestimation":
        constants = _initializers(original)
        return any(n.op_type == "BatchNormalization" and all(i in constants for i in n.input[1:5])
                   for n in original.graph.node)
    return True


def _channel_means(batches, read, tensor):
    total, count = None, 0
    for x in batches:
        value = np.asarray(read(x, tensor), np.float64)
        sums = value.sum(axis=tuple(i for i in range(value.ndim) if i != 1))
        total = sums if total is None else total + sums
        count += value.size // value.shape[1]
    return total / count


def _bias_correction(trainer, original, masks, train, bar):
    targets = _bias_targets(original, masks)
    reference = prepare_model(original, None)
    for _, tensor, _ in targets:
        reference.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    original_session = trainer._session(reference)
    uniform = None

    def read_original(x, tensor):
        return original_session.run([tensor], {trainer.input_name: x})[0]

    def read_perforated(x, tensor):
        return trainer.forward(x, uniform, extra=(tensor,))[tensor]

    b = trainer.batch_size
    usable = len(train) - len(train) % b or len(train)
    chunks = [train.inputs[i:i + b] for i in range(0, usable, b) if len(train.inputs[i:i + b]) == b]
    for key, tensor, (kind, where) in targets:
        uniform = np.full((b, trainer.classes), 1.0 / trainer.classes, np.float32)
        delta = _channel_means(chunks, read_original, tensor) - _channel_means(chunks, read_perforated, tensor)
        if kind == "bias":
            trainer.values[where] = (trainer.values[where] + delta).astype(np.float32)
        else:
            bn = where
            gamma, _, _, var = (trainer.values.get(n, numpy_helper.to_array(_initializers(original)[n]))
                                for n in bn.input[1:5])
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            shift = delta * gamma / np.sqrt(var.astype(np.float64) + eps)
            trainer.values[bn.input[2]] = (trainer.values[bn.input[2]] + shift).astype(np.float32)
        log.debug("bias correction of %s: mean |shift| %.4g", key, float(np.abs(delta).mean()))
        if bar is not None:
            bar.update(1)


def _bn_reestimation(trainer, original, train, bar):
    b = trainer.batch_size
    chunks = [train.inputs[i:i + b] for i in range(0, len(train) - b + 1, b)]
    uniform = np.full((b, trainer.classes), 1.0 / trainer.classes, np.float32)
    for node in original.graph.node:
        if node.op_type != "BatchNormalization" or node.input[3] not in trainer.values:
            continue
        total = squares = None
        count = 0
        for x in chunks:
            value = np.asarray(trainer.forward(x, uniform, extra=(node.input[0],))[node.input[0]], np.float64)
            axes = tuple(i for i in range(value.ndim) if i != 1)
            s, q = value.sum(axis=axes), (value ** 2).sum(axis=axes)
            total, squares = (s, q) if total is None else (total + s, squares + q)
            count += value.size // value.shape[1]
        mean = total / count
        trainer.values[node.input[3]] = mean.astype(np.float32)
        trainer.values[node.input[4]] = np.maximum(squares / count - mean ** 2, 0).astype(np.float32)
        if bar is not None:
            bar.update(1)


class _Checkpoint:
    """The training state after every epoch in one .npz (written through a temporary file); a run with
    the same settings resumes from it."""

    def __init__(self, path, fingerprint):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint

    def load(self):
        if self.path is None or not self.path.exists():
            return None
        import json

        try:
            with np.load(self.path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                arrays = {k: saved[k] for k in saved.files if k != "meta"}
            fingerprint = meta["fingerprint"]
        except Exception as exc:  # not an .npz, truncated, another archive
            raise PerforateError(f"checkpoint {self.path} is not a complete finetune checkpoint ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())}); give another path, or delete it to start over") from exc
        if fingerprint != self.fingerprint:
            raise PerforateError(f"checkpoint {self.path} was written with other settings: "
                                 f"{fingerprint} != {self.fingerprint}")
        state = {part: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(part + "/")}
                 for part in ("values", "m", "v", "best")}
        return meta, state

    def save(self, meta, state) -> None:
        if self.path is None:
            return
        import json

        arrays = {f"{part}/{k}": v for part, values in state.items() for k, v in values.items()}
        arrays["meta"] = np.array(json.dumps(dict(meta, fingerprint=self.fingerprint)))
        with atomic_outputs(self.path) as (temporary,), open(temporary, "wb") as file:
            np.savez(file, **arrays)


def _distill(trainer, teacher, train, evaluate, options, checkpoint, bar, history, started):
    """Adam on the KL (+ label NLL) loss; returns (best values, best epoch, resumed epochs, the peak
    learning rate used, the abandoned attempts). With ``lr_backoff``, training restarts from the input
    at a tenth of the learning rate (at most MAX_BACKOFFS times) when the first epoch more than
    doubles the held-out loss, or when no epoch has improved on the input by the time early stopping
    (or the last epoch) would end it: a rate that suits a small BatchNorm network wrecks a large pretrained one
    (SqueezeNet, docs/results.md)."""
    b = trainer.batch_size
    steps_per_epoch = -(-len(train) // b)
    total = steps_per_epoch * options["epochs"]
    warmup = max(1, min(100, total // 20))
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    initial = {k: x.copy() for k, x in trainer.values.items()}
    # decoupled weight decay (AdamW) on the weight matrices and kernels, not on biases or BatchNorm
    decayed = {k for k, x in initial.items() if x.ndim >= 2} if options["weight_decay"] else set()

    def fresh_state():
        """Adam's moments at zero and the input as the best state (a start, or a back-off's restart)."""
        return ({k: np.zeros_like(x) for k, x in initial.items()}, {k: np.zeros_like(x) for k, x in initial.items()},
                {k: x.copy() for k, x in initial.items()})

    m, v, best = fresh_state()
    best_loss, best_epoch, first_epoch, step, bad = history[0]["loss"], 0, 1, 0, 0
    resumed = 0
    peak = options["learning_rate"]
    attempts = []  # the learning rates abandoned, with the epochs they ran
    loaded = checkpoint.load()
    if loaded is not None:
        meta, state = loaded
        trainer.values.update(state["values"])
        m, v, best = state["m"], state["v"], state["best"]
        best_loss, best_epoch, step, bad = meta["best_loss"], meta["best_epoch"], meta["step"], meta["bad"]
        peak = meta.get("peak_learning_rate", peak)
        attempts = meta.get("abandoned", [])
        history[:] = meta["history"]
        first_epoch = meta["epoch"] + 1
        resumed = meta["epoch"]
        log.info("resumed from %s after epoch %d", checkpoint.path, meta["epoch"])
        if bar is not None:
            bar.update(resumed * steps_per_epoch)
    epoch = first_epoch - 1
    while epoch < options["epochs"]:
        epoch += 1
        if bad >= options["patience"]:
            break
        rng = np.random.default_rng([options["seed"], epoch])
        order = rng.permutation(len(train))
        losses = []
        for idx, _ in _batches(len(train), b, order):
            x, partner, share = mix(augment(train.inputs[idx], options["augment"], rng), options["augment"], rng)
            labels = None if train.labels is None else train.labels[idx]
            target = training_target(teacher(x), labels, options["label_weight"], partner, share,
                                     options["temperature"])
            loss, grads = trainer.loss_and_gradients(x, target)
            losses.append(loss / b)
            lr = peak * _cosine(step, total, warmup)
            step += 1
            correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
            for name, g in grads.items():
                g = g / b
                m[name] = beta1 * m[name] + (1 - beta1) * g
                v[name] = beta2 * v[name] + (1 - beta2) * g * g
                decay = lr * options["weight_decay"] * trainer.values[name] if name in decayed else 0.0
                trainer.values[name] = (trainer.values[name] - decay - lr * (m[name] / correction1) /
                                        (np.sqrt(v[name] / correction2) + eps)).astype(np.float32)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
        metrics = evaluate()
        can_back_off = options["lr_backoff"] and len(attempts) < MAX_BACKOFFS and peak / 10 >= 1e-6
        wrecked = can_back_off and epoch == 1 and not metrics["loss"] <= 2 * history[0]["loss"]  # NaN too
        if not wrecked:
            history.append(dict(epoch=epoch, learning_rate=lr, train_loss=float(np.mean(losses)), **metrics,
                                elapsed_s=round(time.perf_counter() - started, 1)))
            log.info("epoch %d: train loss %.4f, held-out loss %.4f, agreement %.3f", epoch, np.mean(losses),
                     metrics["loss"], metrics["agreement"])
            if metrics["loss"] < best_loss:
                best_loss, best_epoch, bad = metrics["loss"], epoch, 0
                best = {k: x.copy() for k, x in trainer.values.items()}
            else:
                bad += 1
        stalled = can_back_off and best_epoch == 0 and (bad >= options["patience"] or epoch == options["epochs"])
        if wrecked or stalled:
            log.info("peak learning rate %g: %s; restarting from the input at %g", peak,
                     f"epoch 1 raised the held-out loss {history[0]['loss']:.4f} -> {metrics['loss']:.4f}" if wrecked
                     else f"no gain in {epoch} epochs", peak / 10)
            attempts.append(dict(learning_rate=peak, epochs=epoch, reason="wrecked" if wrecked else "no gain"))
            if bar is not None:
                bar.total += epoch * steps_per_epoch
            peak /= 10
            trainer.values.update({k: x.copy() for k, x in initial.items()})
            m, v, best = fresh_state()
            best_loss, best_epoch, step, bad, epoch = history[0]["loss"], 0, 0, 0, 0
            del history[1:]
            continue
        checkpoint.save(dict(epoch=epoch, step=step, best_loss=best_loss, best_epoch=best_epoch, bad=bad,
                             history=history, peak_learning_rate=peak, abandoned=attempts),
                        {"values": trainer.values, "m": m, "v": v, "best": best})
        if options["time_budget_s"] and time.perf_counter() - started > options["time_budget_s"]:
            log.info("fine-tuning stopped after epoch %d: time budget %.0f s spent", epoch, options["time_budget_s"])
            break
    return best, best_epoch, resumed, peak, attempts


def finetune(perforated, original, data, *, method: str = DEFAULTS["method"],
             parameters: str = DEFAULTS["parameters"], epochs: int = DEFAULTS["epochs"],
             batch_size: int = DEFAULTS["batch_size"], learning_rate: float = DEFAULTS["learning_rate"],
             label_weight: float = DEFAULTS["label_weight"], holdout: float = DEFAULTS["holdout"],
             patience: int = DEFAULTS["patience"], augment: str = DEFAULTS["augment"], seed: int = DEFAULTS["seed"],
             threads: int | None = None, checkpoint=None, progress: bool = True,
             time_budget_s: float | None = None, start: Mapping[str, np.ndarray] | None = None,
             lr_backoff: bool = DEFAULTS["lr_backoff"],
             weight_decay: float = DEFAULTS["weight_decay"],
             temperature: float = DEFAULTS["temperature"]) -> FinetuneResult:
    """Recover the accuracy the perforated model lost; see the module docstring.

    ``perforated``: a model made by :func:`~onnx_perforate.rewrite` (or ``tune``) from ``original``; either
    may be a path, a ModelProto or an :class:`~onnx_perforate.analysis.AnalysedModel`.
    ``data``: calibration data as :func:`~onnx_perforate.calibration.calibration_set` accepts it, labels
    optional. Every ``1/holdout``-th image (interleaved, never a contiguous slice) is held out: early
    stopping and the before/after numbers use it. ``method``: ``"distill"``, ``"bias_correction"`` or
    ``"bn_reestimation"``, or several joined by "+" (applied in turn, e.g. ``"bn_reestimation+distill"``);
    ``"auto"`` (default) is ``"bn_reestimation+distill"`` for a model with BatchNormalization, else
    ``"distill"``. ``parameters`` (distill): ``"all"``, ``"perforated"`` or ``"biases"``.
    ``label_weight``: the labels' share of the target distribution (labelled data only; default 0: the
    original's distribution alone). Early stopping reads the KL divergence from the original on the
    held-out images, whatever the label weight.
    ``augment``: ``"auto"`` (flips and crops for 4-D image inputs), ``"none"``, or parts of
    ``AUGMENTATION_PARTS`` joined by "+": ``flip``, ``crop``, ``cutout`` (per image, see :func:`augment`),
    ``mixup``, ``cutmix`` (two images of a batch blended, see :func:`mix`; the original labels the blend,
    and the labels, when weighted in, are blended by the same shares). ``weight_decay``: decoupled (AdamW)
    decay of the weight kernels per unit of learning rate (biases and BatchNorm are not decayed).
    ``temperature`` (distill): the original's and the perforated network's distributions are compared
    softened by it (p^(1/T), renormalised; the loss scaled by T^2), which passes on how the original
    ranks the classes it did not pick; 1 is the plain KL. Early stopping still reads the plain KL.
    ``checkpoint``: an .npz written after every epoch; an existing one with the same
    settings is resumed. Deterministic for a given ``seed`` and thread count. ``start``: values of the
    original's initializers that ``perforated`` already carries (``FinetuneResult.values`` of an earlier
    recovery); the original network stays the teacher. ``lr_backoff`` (distill, default on): when the
    first epoch more than doubles the held-out loss, or no epoch has improved on the input when early
    stopping (or the last epoch) comes, training restarts from the input at a tenth of the learning
    rate, at most twice; ``settings["learning_rate_used"]`` and
    ``settings["learning_rates_abandoned"]`` say what happened.
    """
    started = time.perf_counter()
    # an analysed model (from onnx_perforate.analysis) is taken as the model it holds
    perforated, original = (m.model if isinstance(m, AnalysedModel) else m for m in (perforated, original))
    if method == "auto":  # BN re-estimation first where it applies: cheap, and never worse
        original = load_model(original)
        method = "bn_reestimation+distill" if method_applies("bn_reestimation", original, {}) else "distill"
    if isinstance(method, str) and "+" in method:  # a chain, e.g. "bn_reestimation+distill"
        options = dict(parameters=parameters, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       label_weight=label_weight, holdout=holdout, patience=patience, augment=augment, seed=seed,
                       threads=threads, progress=progress, time_budget_s=time_budget_s, lr_backoff=lr_backoff,
                       weight_decay=weight_decay, temperature=temperature)
        steps = method.split("+")
        if any(step not in METHODS for step in steps):
            raise PerforateError(f"method must be one of {METHODS} or several joined by '+', got {method!r}")
        results = []
        for number, step in enumerate(steps):
            chained = None if checkpoint is None else Path(checkpoint).with_suffix(f".{number}.npz")
            results.append(finetune(results[-1].model if results else perforated, original, data, method=step,
                                    checkpoint=chained, start=results[-1].values if results else start,
                                    **options))
        history = [dict(h, method=r.method) for r in results for h in (r.history if r is results[0] else r.history[1:])]
        settings = dict(results[-1].settings, chain=[r.settings for r in results],
                        elapsed_s=round(time.perf_counter() - started, 1))
        return FinetuneResult(model=results[-1].model, method=method, history=history, before=results[0].before,
                              after=results[-1].after, improved=any(r.improved for r in results), settings=settings,
                              values=results[-1].values)
    if method not in METHODS:
        raise PerforateError(f"method must be one of {METHODS}, got {method!r}")
    if augment != "auto":
        augmentation_parts(augment)
    if weight_decay is None or not 0 <= weight_decay < 1:
        raise PerforateError(f"weight_decay is a fraction of the weights removed per unit of learning rate, in "
                             f"[0, 1); got {weight_decay!r}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if int(value) != value or value < low:
            raise PerforateError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 < holdout < 1:
        raise PerforateError(f"holdout is the fraction of images held out, in (0, 1); got {holdout!r}")
    if not learning_rate > 0:
        raise PerforateError(f"learning_rate must be positive, got {learning_rate!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise PerforateError(f"temperature must be a positive number (1: the plain KL), got {temperature!r}")
    perforated, original = load_model(perforated), load_model(original)
    masks = perforation_masks(perforated, original)
    everything = calibration_set(original, data)
    if everything.labels is not None and len(everything.labels) != len(everything):
        raise PerforateError(f"labels: got {len(everything.labels)} labels for {len(everything)} images "
                             "(expected one class index per image)")
    n_train = len(everything) - max(1, round(holdout * len(everything)))
    if n_train < 1:
        raise PerforateError(f"{len(everything)} images are too few to train on and hold out some")
    train, held = everything.split(n_train)
    if label_weight is None or not 0 <= label_weight <= 1:
        raise PerforateError(f"label_weight must be in [0, 1], got {label_weight!r}")
    if everything.labels is not None:
        classes = _class_count(original, everything.inputs[:1], threads)
        if everything.labels.min() < 0 or everything.labels.max() >= classes:
            raise PerforateError(f"labels must be class indices in [0, {classes}); got values in "
                                 f"[{everything.labels.min()}, {everything.labels.max()}]")
    sample = everything.inputs[: min(4, len(everything))]
    reference = with_values(original, start) if start else original  # what perforated was made from
    check_matches(perforated, reference, masks, sample, threads)
    batch_size = min(int(batch_size), len(train))
    if augment == "auto":
        augment = "flip+crop" if image_layout(everything.inputs.shape) else "none"

    if method == "distill":
        names = trainable_parameters(original, parameters, masks)
    elif method == "bias_correction":
        names = _bias_parameters(original, masks)
    else:
        names = [name for node in original.graph.node if node.op_type == "BatchNormalization"
                 for name in node.input[1:5] if name in _initializers(original)]
        if not names:
            raise PerforateError("bn_reestimation: the model has no BatchNormalization with constant statistics")
    try:
        trainer = PerforatedTrainer(reference, masks, names, batch_size=batch_size, threads=threads,
                                    temperature=float(temperature) if method == "distill" else 1.0)
    except GradientError as error:
        raise PerforateError(f"cannot fine-tune: {error}") from error
    trainer.classes = _class_count(original, sample, threads)
    teacher = _Teacher(original, trainer)
    evaluate = _Evaluator(trainer, teacher, held)
    options = dict(method=method, parameters=parameters if method == "distill" else None, epochs=int(epochs),
                   batch_size=batch_size, learning_rate=learning_rate, label_weight=label_weight,
                   holdout=holdout, patience=int(patience), augment=augment, seed=int(seed),
                   time_budget_s=time_budget_s, lr_backoff=bool(lr_backoff), weight_decay=float(weight_decay),
                   temperature=float(temperature) if method == "distill" else None)
    settings = dict(options, train_images=len(train), holdout_images=len(held), trainable=len(names),
                    trainable_values=int(sum(v.size for v in trainer.values.values())), threads=threads)
    initial = {k: x.copy() for k, x in trainer.values.items()}
    history = [dict(epoch=0, learning_rate=0.0, train_loss=None, **evaluate(),
                    elapsed_s=round(time.perf_counter() - started, 1))]
    bar = None
    if progress:
        from .progress import progress as progress_bar

        total = {"distill": -(-len(train) // batch_size) * int(epochs),
                 "bias_correction": len(_bias_targets(original, masks)),
                 "bn_reestimation": len(names) // 4}[method]
        bar = progress_bar(desc=f"finetune ({method})", total=total, unit="step" if method == "distill" else "layer")
    try:
        if method == "distill":
            fingerprint = dict(options, train_images=len(train), names=names, masks=sorted(masks))
            for free in ("patience", "time_budget_s"):  # may change between a run and its resumption
                fingerprint.pop(free)
            best, best_epoch, resumed, peak, abandoned = _distill(trainer, teacher, train, evaluate, options,
                                                                   _Checkpoint(checkpoint, fingerprint), bar, history,
                                                                   started)
            settings.update(resumed_epochs=resumed, learning_rate_used=peak, learning_rates_abandoned=abandoned)
        else:
            if method == "bias_correction":
                _bias_correction(trainer, original, masks, train, bar)
            else:
                _bn_reestimation(trainer, original, train, bar)
            history.append(dict(epoch=1, learning_rate=0.0, train_loss=None, **evaluate(),
                                elapsed_s=round(time.perf_counter() - started, 1)))
            best, best_epoch = dict(trainer.values), (1 if history[1]["loss"] < history[0]["loss"] else 0)
    finally:
        if bar is not None:
            bar.close()
    improved = best_epoch > 0
    if improved:
        model = apply_parameters(perforated, reference, masks, best, sample, threads)
    else:
        model = perforated
        trainer.values = initial
    settings.update(best_epoch=best_epoch, elapsed_s=round(time.perf_counter() - started, 1))
    values = {k: np.asarray(v) for k, v in (start or {}).items()}
    if improved:
        values.update(best)
    return FinetuneResult(model=model, method=method, history=history, before=_metrics(history[0]),
                          after=_metrics(history[best_epoch]), improved=improved, settings=settings, values=values)


def _metrics(entry) -> dict:
    return {k: entry.get(k) for k in ("loss", "agreement", "top1", "label_loss")}


def _bias_parameters(original, masks):
    names = []
    for _, _, (kind, where) in _bias_targets(original, masks):
        names += [where] if kind == "bias" else [n for n in where.input[1:5]]
    if not names:
        raise PerforateError("bias_correction: no perforated Conv has a bias or a BatchNormalization after it")
    return list(dict.fromkeys(names))


def _class_count(original, x, threads) -> int:
    model = prepare_model(original)
    session = runtime.session(model, threads or None, custom_ops=False, allow_spinning=None, quiet=True)
    out = runtime.class_scores(session.run(None, {session.get_inputs()[0].name: x})[0], "the original model's output")
    return out.shape[1]
