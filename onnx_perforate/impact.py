"""Impact masks (Figurnov et al. 2016, section 3.3).

The impact of position (x, y) of a Conv output V is G(x, y) = sum over channels t of
|dL/dV(x, y, t) * V(x, y, t)|, averaged over calibration data: a first-order estimate of how much the
loss changes when V(x, y, :) is replaced by its nearest neighbour. V is the Conv's own output (before
any BatchNormalization or activation), as in the paper. The positions of highest impact are kept.

The iterative variant perforates in ``steps`` increments and recomputes G **on the current
perforated network** after each: its gradients come from an auxiliary graph that expresses the
perforated network with standard ops (full Conv, then a Gather for the interpolation), so an
interpolated position passes its gradient to the position it copies, and skipped positions have
impact 0 (the masks are nested). The authors' released code recomputed G on the unperforated network
instead; we do not.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from . import validation
from .calibration import CalibrationSet, calibration_set
from .data import check_labels
from .errors import PerforateError
from .float_twin import float_twin
from .gradients import GradientRunner, default_session_options
from .analysis import analyse
from .graph import node_key
from .inspection import inspect
from .masks import Mask, computed_count

log = logging.getLogger(__name__)


def spatial_convs(model) -> dict[str, str]:
    """{Conv key: output tensor} for the perforable Convs with a spatial (non 1x1) kernel."""
    analysed = analyse(model)
    outputs = {node_key(n): n.output[0] for n in analysed.model.graph.node if n.op_type == "Conv"}
    return {
        r.name: outputs[r.name]
        for r in inspect(analysed)
        if r.perforable and r.kernel is not None and tuple(r.kernel) != (1, 1)
    }


def interpolation_index(mask) -> np.ndarray:
    """The perforated network's interpolation as flat positions of the full grid, [Ho, Wo] int64."""
    from .ops import nearest_index

    mask = np.asarray(mask, dtype=bool)
    return np.flatnonzero(mask.ravel())[nearest_index(mask)].astype(np.int64)


def top_positions(impact: np.ndarray, count: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the ``count`` highest-impact positions among ``allowed`` (ties: row-major order)."""
    scores = np.asarray(impact, np.float64).ravel().copy()
    if allowed is not None:
        scores[~np.asarray(allowed, bool).ravel()] = -np.inf
    order = np.argsort(-scores, kind="stable")
    keep = np.zeros(scores.size, dtype=bool)
    keep[order[:count]] = True
    return keep.reshape(np.shape(impact))


def default_loss(calibration: CalibrationSet) -> str:
    """Labelled data: the task loss (NLL of the labels). Unlabelled: NLL of the model's own top-1."""
    return "nll" if calibration.labels is not None else "self_nll"


class ImpactEstimator:
    """Computes impact maps of chosen Convs on the original or a perforated network.

    The gradient graph of each perforation state is built once per batch size and reused. A QDQ model
    is differentiated through its float twin (:mod:`onnx_perforate.float_twin`: clipped straight-through
    estimator, INT8 weights).
    """

    def __init__(self, model, calibration: CalibrationSet, convs: Mapping[str, str], *, loss: str | None = None,
                 batch_size: int = 16, threads: int | None = None):
        self.model = float_twin(analyse(model).model)
        self.calibration = calibration
        self.convs = dict(convs)
        self.loss = loss or default_loss(calibration)
        self.batch_size = batch_size
        self.threads = threads

    def impact(self, masks: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """{Conv key: G [Ho, Wo]} on the network perforated by ``masks`` (None: the original)."""
        interpolation = {
            self.convs[name]: interpolation_index(mask)
            for name, mask in (masks or {}).items()
            if not np.asarray(mask, bool).all()
        }
        options = default_session_options(self.threads) if self.threads else None
        runner = GradientRunner(self.model, list(self.convs.values()), loss=self.loss,
                                interpolation=interpolation, session_options=options)
        items = []
        for feeds, labels in self.calibration.batches(self.batch_size):
            items.append((feeds, labels) if self.loss == "nll" else feeds)
        maps = runner.impact(items)
        return {name: maps[tensor] for name, tensor in self.convs.items()}


def impact(model, data, rates, *, steps: int = 1, loss: str | None = None, subset_size: int | None = None,
           batch_size: int = 16, threads: int | None = None, progress=None) -> dict[str, Mask]:
    """Impact masks for ``model`` from calibration ``data``.

    ``rates``: one rate for every Conv with a spatial kernel, or {Conv name: rate}. ``steps`` > 1 is
    the iterative variant: rates are reached in ``steps`` equal increments, recomputing impact on the
    perforated network each time. ``loss`` defaults to the labels' NLL when the data has labels, else
    the NLL of the model's own prediction. Returns {Conv name: Mask} that :func:`rewrite` accepts.
    """
    analysed = analyse(model)
    model = analysed.model
    calibration = calibration_set(model, data, subset_size=subset_size)
    output_dims = analysed.shapes.get(model.graph.output[0].name, (0, None))[1]
    if calibration.labels is not None and output_dims and all(isinstance(d, int) for d in output_dims[1:]):
        # the labels' loss reads the scores at each label: one past the classes fails in ORT's gradient graph
        check_labels(calibration.labels, "calibration labels", classes=int(np.prod(output_dims[1:])))
    available = spatial_convs(analysed)
    if isinstance(rates, Mapping):
        unknown = sorted(set(rates) - set(available))
        if unknown:
            raise PerforateError(f"no perforable spatial Conv named {unknown}; candidates: {sorted(available)}")
        targets = {name: validation.rate(rate, f"the rate of {name!r}") for name, rate in rates.items()}
    else:
        targets = {name: validation.rate(rates) for name in available}
    steps = validation.integer(steps, "steps")
    estimator = ImpactEstimator(analysed, calibration, {n: available[n] for n in targets}, loss=loss,
                                batch_size=batch_size, threads=threads)
    shapes = {r.name: tuple(r.output_shape[2:]) for r in inspect(analysed) if r.name in targets}
    current = {name: np.ones(shapes[name], bool) for name in targets}
    for step in range(1, steps + 1):
        maps = estimator.impact(current if step > 1 else None)
        for name, rate in targets.items():
            count = computed_count(shapes[name], rate * step / steps)
            current[name] = top_positions(maps[name], count, allowed=current[name])
        log.info("impact step %d/%d done", step, steps)
        if progress:
            progress(step, steps)
    kind = "impact" if steps == 1 else "iterative_impact"
    return {
        name: Mask(current[name], kind=kind, rate=targets[name],
                   details={"steps": steps, "loss": estimator.loss, "calibration_images": len(calibration)})
        for name in targets
    }
