"""The greedy multi-layer schedule (Figurnov et al. 2016, section 3.4).

Each layer climbs a ladder of perforation rates. At every step the tuner tries moving each candidate
layer one rung up, measures the loss L on calibration data and the whole network's time t in ONNX
Runtime with the custom ops, and takes the layer with the least (L - L0) / (t0 - t), where L0, t0
belong to the original network (the paper found this cost much better than the step-to-step one).
It stops at the target speedup or before the accuracy drop exceeds its budget, and keeps the
trade-off curve of every step.

What does not change between steps is computed once: the original network's outputs on the
calibration set, its time t0, and the impact maps (refreshed on the current perforated network every
``refresh_every`` steps, so later masks account for earlier perforation, as in the iterative variant).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from . import masks as mask_kinds
from . import runtime, validation
from .analysis import analyse
from .calibration import CalibrationSet, calibration_set
from .data import check_labels
from .errors import PerforateError
from .graph import atomic_outputs, node_key, save_model, write_json
from .impact import ImpactEstimator, spatial_convs, top_positions
from .inspection import inspect
from .masks import Mask, computed_count
from .passes.op_table import keeps_grid
from .rewrite import rewrite

log = logging.getLogger(__name__)

# Up to 0.9: the tuner can then reach its target by perforating the layers that cost least accuracy
# very heavily instead of spreading perforation over more layers; on the main job's model that
# recovered better (docs/results.md, "The ladder's top rung").
DEFAULT_LADDER = (0.0, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
# The accuracy budget when none is given: the search stops before a step would drop calibration top-1
# (agreement with the original on unlabelled data) by more than 10 points. Fine-tuning recovers part of
# that; a user who wants a tighter result sets a smaller budget.
DEFAULT_MAX_ACCURACY_DROP = 0.10
MASK_KINDS = ("impact", "uniform", "grid")
TIES = ("none", "regions", "auto")
FEW_CALIBRATION_IMAGES = 32  # below this the tuner warns
STEP_RECOVERIES = ("none", "bn_reestimation", "bias_correction")
# Landing on the target: a last move that would overshoot it is cut to the least rate (on this grid)
# predicted to reach the target with this margin, for mask kinds whose masks have exactly the computed
# count a rate asks for (a grid mask snaps to its lattices).
LANDING_RESOLUTION = 0.01
LANDING_MARGIN = 0.01
LANDING_MASK_KINDS = ("impact", "uniform")
# A final network this much faster on the clock than the target gives the excess back: its last move is
# cut to the least rate the latency table, scaled by the clock's verdict, predicts to reach the target.
CLOCK_LANDING_SLACK = 0.03


@dataclass
class TuneStep:
    step: int
    layer: str | None  # the layer moved up at this step (None: the original network)
    rates: dict  # {layer: rate} after the step
    time_ms: float
    speedup: float
    loss: float
    top1: float | None
    top5: float | None
    agreement: float  # top-1 agreement with the original network
    cost: float | None
    elapsed_s: float


@dataclass
class TuneResult:
    model: onnx.ModelProto
    masks: dict
    steps: list  # TuneStep, the first one the original network
    stopped: str
    settings: dict = field(default_factory=dict)
    holdout: dict = field(default_factory=dict)  # the original and the result on images not calibrated on
    step_masks: list = field(default_factory=list)  # {layer: bool mask} after each step (None: not known)
    baselines: dict = field(default_factory=dict)  # "resize": the original fed smaller images (held-out)
    recovery: dict = field(default_factory=dict)  # FinetuneResult.to_dict() when fine-tuned
    # {initializer of the original: value} that ``model`` carries beyond the rewrite (step recovery,
    # fine-tuning): pass it as ``start`` to a later finetune(model, original, ...)
    values: dict = field(default_factory=dict)

    def model_at(self, original, step: int) -> onnx.ModelProto:
        """The perforated model after ``step`` (0: the original), to evaluate points of the curve."""
        if not 0 <= step < len(self.step_masks):
            raise PerforateError(f"step {step} is not on the curve (steps 0 to {len(self.step_masks) - 1})")
        if self.step_masks[step] is None:
            raise PerforateError(f"the masks of step {step} are not known: the search resumed from a checkpoint "
                                 "that did not record them")
        return _perforate(analyse(original), self.step_masks[step])

    @property
    def final(self) -> TuneStep:
        return self.steps[-1]

    def to_dict(self) -> dict:
        return {
            "stopped": self.stopped,
            "settings": self.settings,
            "holdout": self.holdout,
            "baselines": self.baselines,
            "recovery": self.recovery,
            "steps": [asdict(s) for s in self.steps],
            "masks": {name: m.to_dict() for name, m in self.masks.items()},
        }

    def summary(self) -> str:
        """Where it stopped, and the result on held-out images."""
        lines = [f"{self.stopped}: {self.final.speedup:.2f}x in ONNX Runtime after {len(self.steps) - 1} steps "
                 f"({self.settings.get('elapsed_s', 0):.0f} s)"]
        if self.settings.get("measured_speedup"):
            lines.append(f"speed-up predicted from the per-layer latency table {self.final.speedup:.2f}x, "
                         f"timed end to end (interleaved with the original) {self.settings['measured_speedup']:.2f}x")
        landing = self.settings.get("landing")
        if landing:
            kept = (f"timed {landing['measured_speedup']:.2f}x, the ladder's {landing['ladder_rate']:g} "
                    f"{landing['ladder_measured_speedup']:.2f}x" if landing["kept"] == "landed" else
                    f"timed {landing['measured_speedup']:.2f}x, short of the target: the ladder's "
                    f"{landing['ladder_rate']:g} ({landing['ladder_measured_speedup']:.2f}x) was kept instead")
            lines.append(f"the last move was cut to land on the target: {landing['unit']} at {landing['rate']:g} "
                         f"instead of {landing['ladder_rate']:g} ({kept})")
        clock = self.settings.get("clock_landing")
        if clock:
            verdict = ("kept" if clock["kept"] else
                       f"short of the target on the clock: {clock['from_rate']:g} was kept")
            lines.append(f"timed {clock['from_measured_speedup']:.2f}x, beyond the target: {clock['unit']} tried at "
                         f"{clock['rate']:g} instead of {clock['from_rate']:g}, timed {clock['measured_speedup']:.2f}x "
                         f"({verdict})")
        h = self.holdout
        for stage, label in (("tuned", ""), ("recovered", f" after recovery ({self.recovery.get('method')})")):
            if f"{stage}_agreement" not in h:
                continue
            if h.get("original_top1") is not None:
                lines.append(f"held-out {h['images']} images{label}: top-1 {h['original_top1']:.3f} -> "
                             f"{h[f'{stage}_top1']:.3f}, top-5 {h['original_top5']:.3f} -> {h[f'{stage}_top5']:.3f}, "
                             f"agreement with the original {h[f'{stage}_agreement']:.3f}")
            else:
                lines.append(f"held-out {h['images']} images{label}: agreement with the original "
                             f"{h[f'{stage}_agreement']:.3f}")
        resize = self.baselines.get("resize")
        if resize:
            lines.append(compare_with_resize(resize, "recovered" if "recovered" in resize["models"] else "perforated"))
        return "\n".join(lines)

    def baseline_table(self) -> str:
        """Held-out numbers of the result beside the original fed smaller images, all timed interleaved."""
        resize = self.baselines.get("resize")
        if not resize:
            return ""
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        rows = [f"held-out ({resize['data_images']} images), speed timed interleaved:", "",
                "| model | speedup | top-1 | top-5 | agreement | loss |", "|---|---|---|---|---|---|"]
        entries = [("original", resize["original"])]
        entries += [(f"perforated{'' if k == 'perforated' else ', after recovery'}", v)
                    for k, v in resize["models"].items()]
        entries += [(f"input {p['size'][0]}x{p['size'][1]}", p) for p in resize["points"]]
        for name, e in entries:
            rows.append(f"| {name} | {e['speedup']:.2f}x | {fmt(e['top1'])} | {fmt(e['top5'])} | "
                        f"{fmt(e['agreement'])} | {e['loss']:.4f} |")
        if not resize["available"]:
            rows.append(f"\nsmaller inputs: not available ({resize['reason']})")
        return "\n".join(rows)

    def table(self) -> str:
        """The trade-off curve as a Markdown table."""
        rows = ["| step | layer | rate | speedup | time ms | loss | top-1 | top-5 | agreement |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s in self.steps:
            rate = "" if s.layer is None else f"{s.rates[s.layer]:.2f}"
            fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append(f"| {s.step} | {s.layer or '(original)'} | {rate} | {s.speedup:.2f}x | {s.time_ms:.2f} | "
                        f"{s.loss:.4f} | {fmt(s.top1)} | {fmt(s.top5)} | {s.agreement:.3f} |")
        return "\n".join(rows)

    @staticmethod
    def output_paths(output_dir) -> dict:
        """What :meth:`save` writes into ``output_dir``."""
        out = Path(output_dir)
        return {"model": out / "model.onnx", "report": out / "report.json",
                "plot": out / "tradeoff.png", "masks": out / "masks.png"}

    def save(self, output_dir) -> dict:
        """Writes model.onnx, report.json, tradeoff.png and masks.png; returns their paths."""
        paths = self.output_paths(output_dir)
        save_model(self.model, paths["model"], json_files={paths["report"]: self.to_dict()})
        plot_tradeoff(self.steps, paths["plot"], self.baselines.get("resize"))
        plot_masks(self.masks, paths["masks"])
        return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------
# Measuring a network: loss and accuracy on the calibration set, time in ORT.


def as_probabilities(outputs: np.ndarray) -> np.ndarray:
    """[N, classes] probabilities from logits or probabilities (detected: rows of a simplex)."""
    x = runtime.class_scores(outputs).astype(np.float64)
    if x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return np.clip(x, 1e-12, 1.0)
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


class NetworkMeter:
    """Loss and accuracy of a (perforated) model against the original network, and the sessions and
    input its latency is timed with. ``threads``: intra-op threads of the timed sessions;
    ``evaluation_threads``: of the sessions that only compute outputs (None: ONNX Runtime's default,
    every core), so that a search timed at one thread still evaluates on all cores."""

    def __init__(self, original: onnx.ModelProto, calibration: CalibrationSet, *, threads: int | None,
                 batch_size: int, timing_batch: int = 1, evaluation_threads: int | None = None):
        self.calibration = calibration
        self.threads = threads
        self.evaluation_threads = evaluation_threads
        fixed = runtime.model_input(original).fixed_batch
        self.batch_size = fixed or max(1, min(batch_size, len(calibration)))
        self.timing_batch = fixed or timing_batch
        usable = len(calibration) - len(calibration) % self.batch_size
        if usable == 0:
            raise PerforateError(f"the model's fixed batch {fixed} exceeds the {len(calibration)} calibration images")
        self.calibration = calibration.subset(0, usable)
        shape = (self.timing_batch,) + calibration.inputs.shape[1:]
        self.timing_input = runtime.timing_array(shape)
        self.reference = self._probabilities(original)
        self.reference_top1 = self.reference.argmax(axis=1)
        if self.calibration.labels is not None:
            check_labels(self.calibration.labels, "calibration labels", classes=self.reference.shape[1])

    def session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        """A session to time ``model`` with (``threads``)."""
        return runtime.session(model, self.threads)

    def _probabilities(self, model, transform=None) -> np.ndarray:
        session = runtime.session(model, self.evaluation_threads)
        name = self.calibration.input_name
        outputs = [session.run(None, {name: transform(feeds[name]) if transform else feeds[name]})[0]
                   for feeds, _ in self.calibration.batches(self.batch_size)]
        return as_probabilities(np.concatenate(outputs))

    def measure(self, model: onnx.ModelProto, transform=None) -> dict:
        """Loss, top-1/top-5 (labelled data) and agreement with the original; ``transform`` maps every
        input batch first (the resize baseline feeds smaller images). Latency is timed apart, with the
        models it is compared with (:func:`interleaved_ratios`, :func:`interleaved_times`)."""
        probs = self._probabilities(model, transform)
        labels = self.calibration.labels
        if labels is not None:
            loss = float(-np.log(probs[np.arange(len(probs)), labels]).mean())
            ranks = np.argsort(-probs, axis=1)
            top1 = float((ranks[:, 0] == labels).mean())
            top5 = float((ranks[:, :5] == labels[:, None]).any(axis=1).mean())
        else:  # KL(original || perforated): how far the prediction moved
            loss = float((self.reference * (np.log(self.reference) - np.log(probs))).sum(axis=1).mean())
            top1 = top5 = None
        agreement = float((probs.argmax(axis=1) == self.reference_top1).mean())
        return dict(loss=loss, top1=top1, top5=top5, agreement=agreement, time=None)


# ------------------------------------------------------------------------------------------------
# Masks for each rung of each layer's ladder.


class MaskLadder:
    """The mask of every (unit, rate); a unit is a group of Convs that share one mask (one Conv unless
    the tuner ties compact regions). Impact masks are nested: a rung keeps a subset of the rung below.
    A unit's impact is the sum of its members' impact maps, each normalised by its mean."""

    def __init__(self, model, calibration, convs: Mapping[str, str], units: Mapping[str, list], kind: str, *,
                 loss, batch_size, threads, seed: int = 0):
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
        self.kind = kind
        self.seed = seed
        self.units = dict(units)
        conv_shapes = {r.name: tuple(r.output_shape[2:]) for r in inspect(model) if r.name in convs}
        self.shapes = {unit: conv_shapes[members[0]] for unit, members in self.units.items()}
        self.estimator = (ImpactEstimator(model, calibration, convs, loss=loss, batch_size=batch_size,
                                          threads=threads) if kind == "impact" else None)
        self.impact = None

    def refresh(self, current: Mapping[str, np.ndarray]) -> None:
        """Recompute impact on the network perforated by ``current`` ({unit: mask})."""
        if self.estimator is None:
            return
        maps = self.estimator.impact(self.perforated(current))
        self.impact = {unit: sum(maps[m] / max(float(maps[m].mean()), 1e-30) for m in members)
                       for unit, members in self.units.items()}

    def expand(self, masks: Mapping[str, np.ndarray]) -> dict:
        """{unit: mask} -> {Conv: mask}. Units may overlap (``tie="auto"``: a Conv alone and its region);
        a perforated unit's mask wins over an untouched one's all-ones mask."""
        expanded = {}
        for unit, mask in masks.items():
            untouched = bool(np.asarray(mask, bool).all())
            for member in self.units[unit]:
                if not untouched or member not in expanded:
                    expanded[member] = mask
        return expanded

    def perforated(self, masks: Mapping[str, np.ndarray]) -> dict:
        """``expand(masks)`` without the Convs left whole (all-ones masks)."""
        return {conv: mask for conv, mask in self.expand(masks).items() if not mask.all()}

    def mask(self, unit: str, rate: float, current: np.ndarray) -> np.ndarray:
        shape = self.shapes[unit]
        if rate <= 0:
            return np.ones(shape, bool)
        if self.kind == "impact":
            if self.impact is None:
                self.refresh({})
            return top_positions(self.impact[unit], computed_count(shape, rate), allowed=current)
        if self.kind == "grid":
            return np.asarray(mask_kinds.grid(shape, rate))
        return np.asarray(mask_kinds.uniform(shape, rate, seed=self.seed))


def saving_line(rates, savings) -> tuple[float, float]:
    """(fixed, per unit of rate) of the line through measured (rate, saving) points, robust to a rung
    timed during a burst of load: the Theil-Sen estimate (median of the pairwise slopes, then the median
    intercept), with the slope kept >= 0 since skipping more positions does not make a layer slower.
    A least-squares line let one outlier (a first rung timed 2 ms faster than the rest of its ladder
    on a shared machine) predict a saving for a layer that never pays."""
    x, y = np.asarray(rates, np.float64), np.asarray(savings, np.float64)
    if len(x) == 1:
        return 0.0, float(max(y[0] / x[0], 0.0))
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x)) if x[j] != x[i]]
    slope = max(float(np.median(slopes)), 0.0)
    return float(np.median(y - slope * x)), slope


class LatencyTable:
    """The time each (unit, rate) saves, measured once in the whole network and used by every step.

    Timing every candidate network end to end makes the tuner's speed signal as noisy as the machine
    (on a shared machine the chosen path got slower step after step). Here, the first time a unit is a
    candidate, the network with only that unit perforated is built at every rung of its ladder, and all
    of them are timed in alternation with the original, round after round (median per-round ratio).
    The savings then get a robust line in the rate (:func:`saving_line`: a fixed cost of perforating
    plus a saving proportional to the skipped positions), so one noisy rung cannot reorder the ladder. A
    configuration's time is predicted as the original's time minus the savings of its units: the
    prediction is deterministic and the curve cannot zig-zag. The final model is timed end to end
    (interleaved) to confirm it.
    """

    def __init__(self, meter: NetworkMeter, analysed, ladder: MaskLadder, rates, repeats: int):
        self.meter, self.analysed, self.ladder, self.repeats = meter, analysed, ladder, repeats
        self.rates = [float(r) for r in rates if r > 0]
        self.reference = meter.session(analysed.model)
        self.base = interleaved_times(meter, [(self.reference, meter.timing_input)], 2 * repeats)[0]
        self.measured: dict[str, dict] = {}  # unit -> {rate: measured saving (s)}
        self.lines: dict[str, tuple] = {}  # unit -> (fixed, per unit of rate)

    def _measure(self, unit: str) -> None:
        sessions = []
        for rate in self.rates:
            mask = self.ladder.mask(unit, rate, np.ones(self.ladder.shapes[unit], bool))
            sessions.append(self.meter.session(_perforate(self.analysed, self.ladder.expand({unit: mask}))))
        ratios = interleaved_ratios(self.meter, self.reference, sessions, self.repeats)
        self.measured[unit] = {rate: self.base * (1.0 - r) for rate, r in zip(self.rates, ratios)}
        self.lines[unit] = saving_line(self.rates, [self.measured[unit][r] for r in self.rates])

    def saving(self, unit: str, rate: float) -> float:
        if rate <= 0:
            return 0.0
        if unit not in self.lines:
            self._measure(unit)
        fixed, slope = self.lines[unit]
        return fixed + slope * rate

    def predict(self, rates: Mapping[str, float]) -> float:
        """Predicted time of the network with every unit at its rate (seconds)."""
        return self.base - sum(self.saving(unit, rate) for unit, rate in rates.items() if rate > 0)

    def to_dict(self) -> dict:
        return {"base_ms": self.base * 1e3,
                "units": {u: {"fixed_ms": f * 1e3, "per_rate_ms": k * 1e3,
                              "measured_ms": {str(r): v * 1e3 for r, v in self.measured[u].items()}}
                          for u, (f, k) in self.lines.items()}}


def compact_regions(model: onnx.ModelProto, convs) -> dict[str, list]:
    """Groups of ``convs`` that can share one mask and then run compact end to end: Conv B joins
    Conv A's group when B reads A's output through position-wise ops only (elementwise, channel
    Concat, residual Add) and B keeps A's grid (same input and output size). In SqueezeNet that is
    every Fire module between two max-pools, the classifier conv included."""
    convs = list(convs)
    analysed = analyse(model)
    records = {r.name: r for r in inspect(analysed)}
    uses = analysed.consumers
    parent = {c: c for c in convs}

    def find(c):
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    by_key = analysed.nodes
    for a in convs:
        grid = tuple(records[a].output_shape[2:])
        stack, seen = [by_key[a].output[0]], set()
        while stack:
            tensor = stack.pop()
            for node in uses.get(tensor, []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                key = node_key(node) if node.op_type == "Conv" else None
                if key in parent:
                    r = records[key]
                    if tuple(r.input_shape[2:]) == grid and tuple(r.output_shape[2:]) == grid:
                        parent[find(key)] = find(a)
                elif keeps_grid(node):
                    stack.extend(node.output[:1])
    groups: dict[str, list] = {}
    for c in convs:
        groups.setdefault(find(c), []).append(c)
    return {(members[0] if len(members) == 1 else f"{members[0]} (+{len(members) - 1})"): members
            for members in groups.values()}


def next_rung(latency: LatencyTable, ladder, rates: Mapping[str, float], unit: str, rung: int) -> int | None:
    """The rung ``unit`` moves to from ``rung``: the next one up, or, when the latency table predicts
    that the next one would not make the network (at ``rates``) faster, the first rung above that does.
    A first rung often costs more than it saves (the perforated kernel's fixed costs); taking it as a
    step of its own spends accuracy on a slower network, and the curve zig-zags. None when no rung
    above ``rung`` makes the network faster: moving that unit would only cost accuracy."""
    now = latency.predict(rates)
    for candidate in range(rung + 1, len(ladder)):
        if latency.predict(dict(rates, **{unit: ladder[candidate]})) < now:
            return candidate
    return None


def landing_rate(latency: LatencyTable, rates: Mapping[str, float], unit: str, low: float, high: float,
                 target_time: float, resolution: float = LANDING_RESOLUTION) -> float | None:
    """The least rate strictly between ``low`` and ``high`` (a multiple of ``resolution``) at which
    the network, with ``unit`` at that rate and the others at ``rates``, is predicted to take at most
    ``target_time``; None when only ``high`` gets there. A ladder's rungs are coarse at the top (0.8 ->
    0.85 skips a quarter of the positions left), so the move that reaches a target often overshoots
    it, and every position skipped beyond the target costs accuracy for speed nobody asked for."""
    first = math.floor(low / resolution + 1e-9) + 1
    for index in range(first, math.ceil(high / resolution - 1e-9)):
        rate = round(index * resolution, 10)
        if latency.predict(dict(rates, **{unit: rate})) <= target_time:
            return rate
    return None


# ------------------------------------------------------------------------------------------------


def tune(model, data, *, target_speedup: float | None = None, max_accuracy_drop: float | None = None,
         ladder=DEFAULT_LADDER, layers=None, mask_kind: str = "impact", loss: str | None = None,
         subset_size: int | None = 256, batch_size: int = 16, threads: int | None = None, repeats: int = 15,
         timing_batch: int = 1, refresh_every: int = 4, include_1x1: bool = False, tie: str = "none",
         checkpoint=None, progress: bool = True, finetune: bool | Mapping = False,
         baselines: bool = True, monotone: bool = True, step_recovery: str = "none",
         evaluation_threads: int | None = None) -> TuneResult:
    """Greedy perforation schedule; see the module docstring.

    ``data``: calibration data (see :mod:`onnx_perforate.calibration`): ``subset_size`` evenly spaced
    images calibrate, the rest (if any) are held out and the final model is evaluated on them.
    ``timing_batch``: the batch size latency is measured at (a fixed batch in the model wins).
    ``threads``: intra-op threads of every timed session; ``evaluation_threads``: of the work that is
    not timed (the candidates' accuracy, impact gradients, recovery, held-out evaluation; None:
    ONNX Runtime's default, every core).
    ``tie="regions"`` makes every :func:`compact_regions` group (1x1 Convs included) one candidate
    with one shared mask, so that whole regions run compact; ``"none"`` tunes each Conv alone;
    ``"auto"`` offers both moves at every step, each Conv alone and each region of several Convs under
    one mask, and takes whichever costs least loss per time saved; once a Conv has moved, alone or
    with its region, the other kind of move that includes it is no longer offered. ``max_accuracy_drop`` is in top-1 accuracy on labelled data, else in top-1
    agreement with the original network; it defaults to DEFAULT_MAX_ACCURACY_DROP (pass 1.0 for no
    budget). ``checkpoint``: a JSON path written after every step; if it
    exists, the tuner resumes from it. Ctrl-C stops the search and returns what was found so far.
    ``finetune``: True (or a dict of :func:`~onnx_perforate.finetune.finetune` options) recovers the
    final model's accuracy on the calibration images; ``holdout`` then reports it before and after.
    ``baselines``: also measure, on the held-out images, the original fed smaller inputs
    (``baselines["resize"]``), timed interleaved with the result. ``monotone`` (default): every step
    makes the predicted network faster; a layer whose next rung would not pay jumps to the first rung
    that does, and a layer with no such rung left is not moved (:func:`next_rung`).
    ``step_recovery``: ``"none"`` (default), ``"bn_reestimation"`` or ``"bias_correction"``: after every
    step, that training-free recovery (:func:`~onnx_perforate.finetune.finetune`) is applied to the
    network so far, and the next step's candidates are judged on the recovered network. Both methods
    depend only on the current masks, so a resumed search recomputes them. ``TuneResult.model_at``
    gives the curve's points without it; the result carries it (``TuneResult.values``: pass them as
    ``start`` to a later :func:`~onnx_perforate.finetune.finetune`, which refuses the model without).
    """
    started = time.perf_counter()
    if max_accuracy_drop is None:
        max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
    if target_speedup is not None:
        target_speedup = validation.real(target_speedup, "target_speedup", minimum=1.0, exclusive_minimum=True)
    if max_accuracy_drop is not None:
        max_accuracy_drop = validation.real(max_accuracy_drop, "max_accuracy_drop", minimum=0.0, maximum=1.0)
    if isinstance(ladder, (str, bytes)) or not np.iterable(ladder) or not len(ladder):
        raise validation.SettingError(f"ladder must be a non-empty sequence of rates in [0, 1), got {ladder!r}")
    ladder = tuple(sorted({validation.rate(r, "a ladder rate") for r in ladder} | {0.0}))
    subset_size = validation.optional_integer(subset_size, "subset_size")
    batch_size = validation.integer(batch_size, "batch_size")
    threads = validation.optional_integer(threads, "threads")
    if evaluation_threads is not None:
        evaluation_threads = validation.threads(evaluation_threads, "evaluation_threads")
    repeats = validation.integer(repeats, "repeats")
    timing_batch = validation.integer(timing_batch, "timing_batch")
    refresh_every = validation.integer(refresh_every, "refresh_every")
    if mask_kind not in MASK_KINDS:
        raise validation.SettingError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    if tie not in TIES:
        raise validation.SettingError(f"tie must be one of {TIES}, got {tie!r}")
    if step_recovery not in STEP_RECOVERIES:
        raise validation.SettingError(f"step_recovery must be one of {STEP_RECOVERIES}, got {step_recovery!r}")
    analysed = analyse(model)  # loaded, checked and inferred once for every rewrite below
    original = analysed.model
    calibration, holdout = calibration_set(original, data).split(subset_size)
    if len(calibration) < FEW_CALIBRATION_IMAGES:
        log.warning("%d calibration image(s): the loss each step is chosen by is mostly noise (use %d or more)",
                    len(calibration), FEW_CALIBRATION_IMAGES)
    # singles: the Convs tuned alone; convs: every Conv a unit may hold (regions take 1x1 Convs too)
    convs = singles = spatial_convs(analysed)
    if include_1x1 or tie != "none":
        convs = {r.name: _output_of(original, r.name) for r in inspect(analysed) if r.perforable}
    if include_1x1:
        singles = convs
    if layers:
        layers = [layers] if isinstance(layers, str) else list(layers)  # one name, not its letters
        missing = sorted(set(layers) - set(convs))
        if missing:
            raise PerforateError(f"cannot tune {missing}: candidates are {sorted(convs)}")
        convs = {k: v for k, v in convs.items() if k in layers}
        singles = {k: v for k, v in singles.items() if k in layers}
    if not convs:
        raise PerforateError("the model has no perforable Conv with a spatial kernel")
    if tie == "regions":
        units = compact_regions(analysed, convs)
    elif tie == "auto":  # every Conv alone (as tie="none" would), and every region of several Convs
        units = {name: [name] for name in singles}
        units.update({name: members for name, members in compact_regions(analysed, convs).items()
                      if len(members) > 1})
    else:
        units = {name: [name] for name in convs}
    if not units:  # tie="auto" with only 1x1 Convs named, alone in their regions
        raise PerforateError(f"no candidate among {sorted(convs)}: a 1x1 Conv is tuned alone only with "
                             "include_1x1, or with its region (tie='regions' or 'auto', when the region has others)")
    if step_recovery == "bn_reestimation":
        from .finetune import method_applies

        if not method_applies(step_recovery, original, {}):
            raise validation.SettingError("step_recovery='bn_reestimation': the model has no BatchNormalization "
                                          "with constant statistics")

    meter = NetworkMeter(original, calibration, threads=threads, batch_size=batch_size, timing_batch=timing_batch,
                         evaluation_threads=evaluation_threads)
    ladder_masks = MaskLadder(analysed, calibration, convs, units, mask_kind, loss=loss, batch_size=batch_size,
                              threads=evaluation_threads)
    base = meter.measure(original)
    latency = LatencyTable(meter, analysed, ladder_masks, ladder, repeats)
    base["time"] = latency.base
    accuracy0 = _accuracy(base)
    steps = [_step(0, None, {}, base, base, None, started)]
    step_masks = [{}]
    rungs = {unit: 0 for unit in units}
    current = {unit: np.ones(ladder_masks.shapes[unit], bool) for unit in units}
    settings = dict(target_speedup=target_speedup, max_accuracy_drop=max_accuracy_drop, ladder=list(ladder),
                    mask_kind=mask_kind, calibration_images=len(meter.calibration), threads=threads,
                    evaluation_threads=evaluation_threads,
                    timing_batch=meter.timing_batch,
                    repeats=repeats, refresh_every=refresh_every, layers=sorted(convs), tie=tie, monotone=monotone,
                    step_recovery=step_recovery,
                    units={u: m for u, m in units.items() if len(m) > 1},
                    loss="nll" if calibration.labels is not None else "kl")
    # What a checkpoint must match to be resumed: the same search on the same model and data.
    identity = dict(ladder=list(ladder), mask_kind=mask_kind, layers=units, tie=tie, subset_size=subset_size,
                    monotone=monotone, step_recovery=step_recovery,
                    threads=threads, timing_batch=meter.timing_batch, refresh_every=refresh_every,
                    model=_model_fingerprint(original), data=_data_fingerprint(calibration))
    if checkpoint and Path(checkpoint).exists():
        rungs, current, steps, step_masks = _resume(checkpoint, identity, ladder_masks.shapes)
        log.info("resumed from %s at step %d", checkpoint, len(steps) - 1)
    # The network the candidates are built from: the original, or with its step recovery's values.
    working, values = analysed, {}
    if step_recovery != "none" and any(rungs.values()):
        working, values = _recover_step(analysed, ladder_masks.expand(current), calibration, step_recovery,
                                        evaluation_threads)

    stopped = "every layer reached the top of its ladder"
    landing = None  # the last move as the ladder had it, when it was cut to land on the target
    before_last_move = None  # the unit masks before the last move this run took (None: it took none)
    bar = _progress(progress, target_speedup, total=len(units) * (len(ladder) - 1))
    try:
        while True:
            latest = steps[-1]
            if target_speedup and latest.speedup >= target_speedup:
                stopped = f"reached the target speedup {target_speedup:g}x"
                break
            if mask_kind == "impact" and (len(steps) - 1) % refresh_every == 0:
                ladder_masks.refresh(current)
            best = None
            now = dict(latest.rates)  # {unit: rate}; a landed last move's rate is off the ladder
            moved = {member: unit for unit in now for member in units[unit]}
            # tie="auto": a unit sharing a Conv with another unit that moved is no longer a candidate
            blocked = {u for u in units if any(moved.get(member, u) != u for member in units[u])}
            for number, name in enumerate(units, 1):
                if rungs[name] + 1 >= len(ladder):
                    continue
                if name in blocked:
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"trying {name} ({number}/{len(units)})")
                rung = next_rung(latency, ladder, now, name, rungs[name]) if monotone else rungs[name] + 1
                if rung is None:
                    continue
                rate = ladder[rung]
                trial = dict(current, **{name: ladder_masks.mask(name, rate, current[name])})
                candidate = _perforate(working, ladder_masks.expand(trial))
                measured = meter.measure(candidate)
                measured["time"] = latency.predict(dict(now, **{name: rate}))
                gain = base["time"] - measured["time"]
                cost = (measured["loss"] - base["loss"]) / gain if gain > 0 else math.inf
                log.debug("candidate %s -> %.2f: loss %.4f, %.2f ms, cost %.4g", name, rate, measured["loss"],
                          measured["time"] * 1e3, cost)
                # No candidate faster than the original yet (low rates can cost more than they save):
                # take the fastest one, so the search moves towards the rates that do pay.
                rank = (cost, measured["loss"]) if math.isfinite(cost) else (math.inf, measured["time"])
                if best is None or rank < best[0]:
                    best = (rank, name, rung, trial, candidate, measured)
            if best is None:
                if any(rungs[u] + 1 < len(ladder) for u in units if u not in blocked):
                    stopped = "no layer's next rungs would make the network faster (per-layer latency table)"
                elif blocked:
                    stopped = ("every unit reached the top of its ladder or shares a Conv with one that moved "
                               f"({len(blocked)} blocked)")
                break
            (cost, _), name, rung, trial, candidate, measured = best
            rate = ladder[rung]
            cut = None  # this move as the ladder had it, if it is cut to land on the target
            landing_time = base["time"] / (target_speedup * (1 + LANDING_MARGIN)) if target_speedup else None
            if landing_time is not None and mask_kind in LANDING_MASK_KINDS and measured["time"] < landing_time:
                landed = landing_rate(latency, now, name, now.get(name, 0.0), rate, landing_time)
                if landed is not None:
                    landed_trial = dict(current, **{name: ladder_masks.mask(name, landed, current[name])})
                    landed_measured = dict(
                        meter.measure(_perforate(working, ladder_masks.expand(landed_trial))),
                        time=latency.predict(dict(now, **{name: landed})))
                    log.debug("landing %s at %.2f instead of %.2f: loss %.4f instead of %.4f", name, landed, rate,
                              landed_measured["loss"], measured["loss"])
                    cut = dict(unit=name, rate=rate, trial=trial, measured=measured, cost=cost)
                    rate, trial, measured = landed, landed_trial, landed_measured
                    cost = (measured["loss"] - base["loss"]) / (base["time"] - measured["time"])
            accuracy = _accuracy(measured)
            if max_accuracy_drop is not None and accuracy0 - accuracy > max_accuracy_drop:
                stopped = (f"the next step ({name} -> {rate:g}) would drop accuracy by "
                           f"{accuracy0 - accuracy:.3f} > {max_accuracy_drop:g}")
                break
            if step_recovery != "none":  # into locals first: a Ctrl-C here must leave the last step whole
                recovered, recovered_values = _recover_step(analysed, ladder_masks.expand(trial), calibration,
                                                            step_recovery, evaluation_threads)
                measured = dict(meter.measure(_perforate(recovered, ladder_masks.expand(trial))),
                                time=measured["time"])
                working, values = recovered, recovered_values
            rungs[name] = rung
            before_last_move = current
            current = trial
            steps.append(_step(len(steps), name, dict(now, **{name: rate}), measured, base, cost, started))
            landing = cut  # only a move that was taken (not one the budget refused) can be confirmed or undone
            step_masks.append(ladder_masks.perforated(current))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(speedup=f"{steps[-1].speedup:.2f}x", loss=f"{measured['loss']:.3f}")
            if checkpoint:
                _save_checkpoint(checkpoint, identity, rungs, current, steps, step_masks)
    except KeyboardInterrupt:
        stopped = "interrupted; the result holds the steps found so far"
    finally:
        if bar is not None:
            bar.close()

    def masks_of(unit_masks, rates):
        return {member: Mask(unit_masks[unit], kind=mask_kind, rate=rates[unit])
                for unit, members in units.items() if rungs[unit] > 0 for member in members}

    final_masks = masks_of(current, steps[-1].rates)
    final_model = _perforate(working, final_masks)
    if final_masks:  # the prediction, confirmed end to end
        sessions = [meter.session(final_model)]
        if landing is not None:  # timed beside the move as the ladder had it
            sessions.append(meter.session(_perforate(working, ladder_masks.expand(landing["trial"]))))
        speedups = [1.0 / r for r in interleaved_ratios(meter, latency.reference, sessions, 2 * repeats)]
        settings["measured_speedup"] = round(speedups[0], 3)
        if landing is not None:
            unit = landing["unit"]
            settings["landing"] = dict(unit=unit, rate=steps[-1].rates[unit], ladder_rate=landing["rate"],
                                       measured_speedup=round(speedups[0], 3),
                                       ladder_measured_speedup=round(speedups[1], 3), kept="landed")
            overshoot = landing["measured"]
            within_budget = max_accuracy_drop is None or accuracy0 - _accuracy(overshoot) <= max_accuracy_drop
            # The prediction was optimistic: the landed network misses the target on the clock while the
            # ladder's move reaches it, so the ladder's move is the result.
            if speedups[0] < target_speedup <= speedups[1] and within_budget:
                current = landing["trial"]
                rates = dict(steps[-1].rates, **{unit: landing["rate"]})
                if step_recovery != "none":
                    working, values = _recover_step(analysed, ladder_masks.expand(current), calibration,
                                                    step_recovery, evaluation_threads)
                final_masks = masks_of(current, rates)
                final_model = _perforate(working, final_masks)
                if step_recovery != "none":  # the step's numbers on the recovered network, as for every step
                    overshoot = dict(meter.measure(final_model), time=overshoot["time"])
                steps[-1] = _step(steps[-1].step, unit, rates, overshoot, base, landing["cost"], started)
                step_masks[-1] = ladder_masks.perforated(current)
                settings["measured_speedup"] = round(speedups[1], 3)
                settings["landing"]["kept"] = "ladder"
        # The clock may also find the table pessimistic (main job: 1.51x predicted, 1.59x timed): every
        # position skipped beyond the target costs accuracy for speed nobody asked for. (Not after a
        # landing the clock refused: there the clock has just found the table optimistic.)
        if (target_speedup and mask_kind in LANDING_MASK_KINDS and step_recovery == "none"
                and before_last_move is not None and settings.get("landing", {}).get("kept") != "ladder"
                and settings["measured_speedup"] > target_speedup * (1 + CLOCK_LANDING_SLACK)):
            unit, rates = steps[-1].layer, steps[-1].rates
            low = steps[-2].rates.get(unit, 0.0)
            # the table's time scaled by how much faster than predicted the clock found the network, aimed
            # at twice the landing margin (the cut is timed once more, and kept only with the margin)
            clock_time = (base["time"] * settings["measured_speedup"] /
                          (steps[-1].speedup * target_speedup * (1 + 2 * LANDING_MARGIN)))
            landed = landing_rate(latency, rates, unit, low, rates[unit], clock_time)
            if landed is not None:
                trial = dict(current, **{unit: ladder_masks.mask(unit, landed, before_last_move[unit])})
                landed_rates = dict(rates, **{unit: landed})
                landed_model = _perforate(working, masks_of(trial, landed_rates))
                clock = 1.0 / interleaved_ratios(meter, latency.reference, [meter.session(landed_model)],
                                                 2 * repeats)[0]
                settings["clock_landing"] = dict(unit=unit, rate=landed, from_rate=rates[unit],
                                                 measured_speedup=round(clock, 3),
                                                 from_measured_speedup=settings["measured_speedup"],
                                                 kept=clock >= target_speedup * (1 + LANDING_MARGIN))
                if settings["clock_landing"]["kept"]:
                    measured = dict(meter.measure(landed_model), time=latency.predict(landed_rates))
                    gain = base["time"] - measured["time"]
                    cost = (measured["loss"] - base["loss"]) / gain if gain > 0 else math.inf
                    steps[-1] = _step(steps[-1].step, unit, landed_rates, measured, base, cost, started)
                    step_masks[-1] = ladder_masks.perforated(trial)
                    current, final_masks, final_model = trial, masks_of(trial, landed_rates), landed_model
                    settings["measured_speedup"] = round(clock, 3)
    recovered, recovery = None, {}
    if finetune and final_masks:
        from .finetune import finetune as recover

        options = dict(threads=evaluation_threads, progress=progress,
                       **({} if finetune is True else dict(finetune)))
        if values:  # the step recovery's values are where the fine-tuning starts
            options.setdefault("start", values)
        outcome = recover(final_model, original, calibration, **options)
        recovered, recovery = outcome.model, outcome.to_dict()
        values = outcome.values
        log.info("%s", outcome.summary())
    models = {"perforated": final_model, **({"recovered": recovered} if recovered is not None else {})}
    baseline = {}
    if baselines and final_masks:
        evaluation = holdout if holdout is not None and len(holdout) else meter.calibration
        try:
            baseline = {"resize": resize_baseline(original, evaluation, threads=threads, batch_size=batch_size,
                                                  timing_batch=meter.timing_batch, repeats=2 * repeats,
                                                  models=models, evaluation_threads=evaluation_threads)}
            baseline["resize"]["data"] = "held-out" if evaluation is holdout else "calibration"
        except PerforateError as error:  # fewer images than a fixed batch
            log.warning("resize baseline skipped: %s", error)
    settings["latency_table"] = latency.to_dict()
    settings["elapsed_s"] = round(time.perf_counter() - started, 1)
    return TuneResult(model=recovered if recovered is not None else final_model, masks=final_masks, steps=steps,
                      stopped=stopped, settings=settings,
                      holdout=_evaluate_holdout(original, models, holdout, evaluation_threads, batch_size),
                      step_masks=step_masks, baselines=baseline, recovery=recovery, values=values)


def _evaluate_holdout(original, models: Mapping, holdout: CalibrationSet | None, evaluation_threads,
                      batch_size) -> dict:
    """Accuracy of the original and the tuned model (and the recovered one) on the images the tuner
    never saw."""
    if holdout is None or len(holdout) == 0:
        return {}
    try:
        meter = NetworkMeter(original, holdout, threads=None, batch_size=batch_size,
                             evaluation_threads=evaluation_threads)
    except PerforateError:  # fewer held-out images than a fixed batch
        return {}
    before = meter.measure(original)
    result = {"images": len(meter.calibration), **{f"original_{k}": before[k] for k in ("top1", "top5", "loss")}}
    for label, model in models.items():
        after = meter.measure(model)
        stage = "tuned" if label == "perforated" else label
        result.update({f"{stage}_{k}": after[k] for k in ("top1", "top5", "loss", "agreement")})
    return result


def _accuracy(measured: dict) -> float:
    """What the accuracy budget reads: top-1 on labelled data, else top-1 agreement with the original."""
    return measured["top1"] if measured["top1"] is not None else measured["agreement"]


def _output_of(model, key):
    return next(n.output[0] for n in model.graph.node if node_key(n) == key)


def _recover_step(analysed, masks: Mapping[str, np.ndarray], calibration, method: str, evaluation_threads):
    """(the analysed original with the values ``method`` gives the network perforated with ``masks``,
    those values); the original itself when the recovery gains nothing on its held-out images."""
    from .finetune import finetune as recover, method_applies, with_values

    masks = {k: v for k, v in masks.items() if not np.asarray(v, bool).all()}
    if not masks:
        return analysed, {}
    if not method_applies(method, analysed.model, masks):  # e.g. no perforated Conv has a bias to shift
        return analysed, {}
    outcome = recover(rewrite(analysed, masks), analysed.model, calibration, method=method, threads=evaluation_threads,
                      progress=False)
    if not outcome.improved:
        return analysed, {}
    return analyse(with_values(analysed.model, outcome.values)), outcome.values


def _perforate(analysed, masks: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    masks = {k: v for k, v in masks.items() if not np.asarray(v, bool).all()}
    return rewrite(analysed, masks) if masks else analysed.model


def _step(index, layer, rates, measured, base, cost, started) -> TuneStep:
    return TuneStep(step=index, layer=layer, rates=dict(rates), time_ms=measured["time"] * 1e3,
                    speedup=base["time"] / measured["time"], loss=measured["loss"], top1=measured["top1"],
                    top5=measured["top5"], agreement=measured["agreement"],
                    cost=None if cost is None or not math.isfinite(cost) else cost,
                    elapsed_s=round(time.perf_counter() - started, 2))


def _progress(enabled, target, total):
    if not enabled:
        return None
    from .progress import progress

    # total: every rung of every ladder, the most steps the search can take
    return progress(desc="tune" + (f" to {target:g}x" if target else ""), unit="step", total=total, leave=True)


def _model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph and its weights (piecewise: a model over 2 GB cannot be serialized whole)."""
    digest = hashlib.sha256()
    for part in list(model.graph.node) + list(model.graph.input) + list(model.graph.output):
        digest.update(part.SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(tensor.name.encode())
        digest.update(tensor.raw_data if tensor.raw_data else tensor.SerializeToString())
    return digest.hexdigest()


def _data_fingerprint(calibration: CalibrationSet) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(calibration.inputs).tobytes())
    digest.update(b"labels" if calibration.labels is None else calibration.labels.tobytes())
    return digest.hexdigest()


def _pack(mask: np.ndarray) -> list:
    return np.packbits(mask.ravel()).tolist()


def _unpack(packed, shape) -> np.ndarray:
    bits = np.unpackbits(np.asarray(packed, np.uint8))[: shape[0] * shape[1]]
    return bits.astype(bool).reshape(shape)


def _save_checkpoint(path, identity, rungs, current, steps, step_masks) -> None:
    state = {
        "identity": identity,
        "rungs": rungs,
        "masks": {k: _pack(v) for k, v in current.items()},
        "shapes": {k: list(v.shape) for k, v in current.items()},
        "steps": [asdict(s) for s in steps],
        # every point of the curve, so that TuneResult.model_at works after a resume: {conv: [shape, bits]}
        "step_masks": [None if m is None else {k: [list(v.shape), _pack(v)] for k, v in m.items()}
                       for m in step_masks],
    }
    write_json(state, path)


_IDENTITY_NAMES = {"model": "the model", "data": "the calibration data (or its subset)", "layers": "the tuned layers"}


def _resume(path, identity: dict, shapes: Mapping[str, tuple]):
    """The state of checkpoint ``path``, if it was written by the same search (``identity``: settings
    and fingerprints of model and data); otherwise an error naming what changed."""
    try:
        state = json.loads(Path(path).read_text())
        saved, rungs, packed_masks = state["identity"], dict(state["rungs"]), state["masks"]
        saved_steps = [TuneStep(**s) for s in state["steps"]]
        saved_shapes = {k: tuple(v) for k, v in state["shapes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PerforateError(f"checkpoint {path} is not a complete tuner checkpoint ({type(exc).__name__}: {exc}); "
                             "delete it to start over") from exc
    expected = json.loads(json.dumps(identity))  # the JSON form, as it was saved
    changed = [key for key in expected if saved.get(key) != expected[key]]
    if changed:
        described = ", ".join(f"{_IDENTITY_NAMES.get(k, k)} ({saved.get(k)!r} -> {expected[k]!r})"
                              if k not in ("model", "data") else _IDENTITY_NAMES[k] for k in changed)
        raise PerforateError(f"checkpoint {path} was written by a different search: changed {described}; "
                             "resume with the same model, data and settings, or delete the checkpoint")
    ladder = identity["ladder"]
    if set(rungs) != set(shapes) or any(not 0 <= r < len(ladder) for r in rungs.values()) or saved_shapes != {
            k: tuple(v) for k, v in shapes.items()} or not saved_steps:
        raise PerforateError(f"checkpoint {path} is inconsistent with its own settings; delete it to start over")
    current = {name: _unpack(packed, saved_shapes[name]) for name, packed in packed_masks.items()}
    # Checkpoints written before the masks of every step were recorded: those steps stay unknown.
    saved_step_masks = state.get("step_masks") or [{}] + [None] * (len(saved_steps) - 1)
    step_masks = [None if m is None else {k: _unpack(bits, shape) for k, (shape, bits) in m.items()}
                  for m in saved_step_masks]
    if len(step_masks) != len(saved_steps):
        raise PerforateError(f"checkpoint {path} is inconsistent with its own settings; delete it to start over")
    return rungs, current, saved_steps, step_masks


# ------------------------------------------------------------------------------------------------
# The baseline a user would try first: the same model fed smaller images.

RESIZE_SCALES = (0.9, 0.8, 0.7, 0.6)


def resized_input_model(model: onnx.ModelProto, size, layout: str) -> onnx.ModelProto:
    """A copy of ``model`` whose image input is ``size`` (H, W); every other declared shape is cleared
    so that ONNX Runtime infers them again."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {t.name for t in graph.initializer}
    value = next(v for v in graph.input if v.name not in initializers)
    dims = value.type.tensor_type.shape.dim
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    for axis, extent in zip(axes, size):
        dims[axis].Clear()
        dims[axis].dim_value = int(extent)
    graph.ClearField("value_info")
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    return result


class ImageResizer:
    """Bilinear, antialiased downscaling of an image batch (ONNX Resize run by ORT)."""

    def __init__(self, layout: str):
        from onnx import TensorProto, helper

        self.layout = layout
        graph = helper.make_graph(
            [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", antialias=1)], "resize",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"]),
             helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray, size) -> np.ndarray:
        x = np.asarray(x, np.float32)
        nchw = x if self.layout == "NCHW" else x.transpose(0, 3, 1, 2)
        sizes = np.array([nchw.shape[0], nchw.shape[1], *size], np.int64)
        y = self.session.run(None, {"x": np.ascontiguousarray(nchw), "sizes": sizes})[0]
        return y if self.layout == "NCHW" else np.ascontiguousarray(y.transpose(0, 2, 3, 1))


def interleaved_times(meter: NetworkMeter, runs, repeats: int) -> list[float]:
    """Median latency of each (session, input) in ``runs``, timed in alternation round after round
    (runtime.time_interleaved) so that the machine's slow phases hit every model alike; each session
    has its own input (the resize baseline feeds smaller images)."""
    feeds = [{meter.calibration.input_name: inputs} for _, inputs in runs]
    wall = runtime.time_interleaved([session for session, _ in runs], feeds, repeats, warmup=3).wall
    return [statistics.median(t) for t in wall]


def interleaved_ratios(meter: NetworkMeter, reference, sessions, repeats: int) -> list[float]:
    """Per session, the median over rounds of time(session) / time(reference), all timed in the same
    interleaved rounds (runtime.time_interleaved), so slow phases of the machine hit them alike."""
    feeds = {meter.calibration.input_name: meter.timing_input}
    wall = runtime.time_interleaved([reference, *sessions], feeds, repeats, warmup=2).wall
    return [statistics.median(t / b for t, b in zip(times, wall[0])) for times in wall[1:]]


def resize_baseline(original: onnx.ModelProto, data: CalibrationSet, *, threads, batch_size, timing_batch,
                    repeats, models: Mapping[str, onnx.ModelProto] | None = None,
                    scales=RESIZE_SCALES, evaluation_threads: int | None = None) -> dict:
    """Held-out metrics and interleaved speed of the original fed smaller images, and of ``models``
    ({label: perforated model}) timed in the same rounds. ``available`` is False, with the reason, when
    the model cannot take another input size (e.g. Flatten + Gemm heads)."""
    from .finetune import image_layout

    meter = NetworkMeter(original, data, threads=threads, batch_size=batch_size, timing_batch=timing_batch,
                         evaluation_threads=evaluation_threads)
    result = {"data_images": len(meter.calibration), "available": False, "reason": None, "points": [],
              "models": {}}
    layout = image_layout(data.inputs.shape)
    base = meter.measure(original)
    runs = [(meter.session(original), meter.timing_input)]
    labels = ["original"]
    for label, model in (models or {}).items():
        measured = meter.measure(model)
        result["models"][label] = {k: measured[k] for k in ("loss", "top1", "top5", "agreement")}
        runs.append((meter.session(model), meter.timing_input))
        labels.append(label)
    sizes = []
    if layout is None:
        result["reason"] = f"the input {list(data.inputs.shape[1:])} is not an image batch (NCHW or NHWC)"
    else:
        resizer = ImageResizer(layout)
        h, w = data.inputs.shape[2:] if layout == "NCHW" else data.inputs.shape[1:3]
        for scale in scales:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            if size in sizes or size == (h, w):
                continue
            model = resized_input_model(original, size, layout)
            small = resizer(meter.timing_input, size)
            try:
                session = meter.session(model)
                session.run(None, {meter.calibration.input_name: small})
            except Exception as error:  # ORT names the node that refuses the new size
                first = str(error).strip().splitlines()[0][:300]
                result["reason"] = (f"the model cannot take another input size: at {size[0]}x{size[1]} "
                                    f"ONNX Runtime fails: {first}")
                break
            measured = meter.measure(model, transform=lambda x, size=size: resizer(x, size))
            result["points"].append(dict(size=list(size), scale=scale,
                                         **{k: measured[k] for k in ("loss", "top1", "top5", "agreement")}))
            runs.append((session, small))
            labels.append(f"{size[0]}x{size[1]}")
            sizes.append(size)
        result["available"] = bool(sizes)
    times = interleaved_times(meter, runs, repeats)
    speed = {label: times[0] / t for label, t in zip(labels, times)}
    for label in result["models"]:
        result["models"][label]["speedup"] = speed[label]
    for point in result["points"]:
        point["speedup"] = speed[f"{point['size'][0]}x{point['size'][1]}"]
        point["time_ms"] = times[labels.index(f"{point['size'][0]}x{point['size'][1]}")] * 1e3
    result["original"] = dict({k: base[k] for k in ("loss", "top1", "top5", "agreement")}, speedup=1.0,
                              time_ms=times[0] * 1e3)
    return result


def resize_at(baseline: dict, speedup: float, key: str) -> float | None:
    """The resized input's ``key`` metric at ``speedup``, linear between measured sizes (None outside
    the measured range)."""
    points = sorted([baseline["original"]] + baseline["points"], key=lambda p: p["speedup"])
    for a, b in zip(points, points[1:]):
        if a["speedup"] <= speedup <= b["speedup"] and a[key] is not None:
            if b["speedup"] == a["speedup"]:
                return a[key]
            t = (speedup - a["speedup"]) / (b["speedup"] - a["speedup"])
            return a[key] + t * (b[key] - a[key])
    return None


def compare_with_resize(baseline: dict, label: str = "perforated") -> str:
    """One plain sentence: which is better at the perforated model's speed, perforation or resizing."""
    if not baseline:
        return ""
    if not baseline.get("available"):
        return f"resize baseline: not available ({baseline.get('reason')})"
    ours = baseline["models"].get(label)
    if ours is None:
        return ""
    key = "top1" if ours.get("top1") is not None else "agreement"
    name = "top-1" if key == "top1" else "agreement with the original"
    theirs = resize_at(baseline, ours["speedup"], key)
    if theirs is None:
        fastest = max(p["speedup"] for p in baseline["points"])
        return (f"at {ours['speedup']:.2f}x no smaller input was measured (they span 1.00x to {fastest:.2f}x); "
                f"perforation's held-out {name} is {ours[key]:.3f}")
    verdict = "perforation is better" if ours[key] > theirs else (
        "resizing the input is better" if ours[key] < theirs else "they are equal")
    return (f"at {ours['speedup']:.2f}x (timed interleaved): held-out {name} {ours[key]:.3f} perforated "
            f"vs {theirs:.3f} with a smaller input: {verdict}")


# ------------------------------------------------------------------------------------------------
# Pictures.


def plot_tradeoff(steps, path, resize: dict | None = None) -> None:
    """The tuner's curve on calibration data, its loss and, when measured, the held-out comparison with
    the original fed smaller images (all timed interleaved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speedup = [s.speedup for s in steps]
    panels = 3 if resize else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    left, right = axes[0], axes[1]
    if steps[0].top1 is not None:
        left.plot(speedup, [s.top1 for s in steps], "o-", label="top-1")
        left.plot(speedup, [s.top5 for s in steps], "s-", label="top-5")
    left.plot(speedup, [s.agreement for s in steps], "^--", label="agreement with original")
    left.set_xlabel("speedup in ONNX Runtime (x)")
    left.set_ylabel("accuracy on calibration data")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(speedup, [s.loss for s in steps], "o-", color="C3")
    right.set_xlabel("speedup in ONNX Runtime (x)")
    right.set_ylabel("loss (NLL)" if steps[0].top1 is not None else "KL to original")
    right.grid(alpha=0.3)
    if resize:
        ax = axes[2]
        key = "top1" if resize["original"]["top1"] is not None else "agreement"
        points = [resize["original"]] + resize["points"]
        ax.plot([p["speedup"] for p in points], [p[key] for p in points], "s-", color="C7",
                label="smaller input" if resize["points"] else "original")
        for p in resize["points"]:
            ax.annotate(f"{p['size'][0]}px", (p["speedup"], p[key]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
        styles = {"perforated": ("o", "C0", "perforated"), "recovered": ("*", "C2", "perforated + recovery")}
        for label, entry in resize["models"].items():
            marker, color, text = styles.get(label, ("o", "C1", label))
            ax.plot([entry["speedup"]], [entry[key]], marker, color=color, markersize=10, label=text)
        if not resize["available"]:
            ax.set_title("smaller inputs: not possible for this model", fontsize=8)
        ax.set_xlabel("speedup, timed interleaved (x)")
        ax.set_ylabel(("top-1" if key == "top1" else "agreement with original") + f" ({resize.get('data', 'held-out')})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Greedy perforation: speed / accuracy trade-off")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_masks(masks: Mapping[str, Mask], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(masks)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        mask = masks[name]
        ax.imshow(np.asarray(mask), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nr = {mask.achieved_rate:.2f}", fontsize=8)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no layer perforated", ha="center")
    fig.suptitle("Perforation masks (white = computed)")
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_outputs(path) as (temporary,):
            fig.savefig(temporary, dpi=110, format="png")
    finally:
        plt.close(fig)
