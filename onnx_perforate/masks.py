"""Perforation masks: which output positions of a Conv are computed.

``rate`` is always the fraction of positions *skipped*; a mask computes
``max(1, round((1 - rate) * Ho * Wo))`` positions (``grid`` approximates it with a lattice and reports
what it achieved). Every function returns a :class:`Mask`, which converts to a bool numpy array.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from . import validation
from .errors import EmptyMaskError, MaskError, PerforateError, SettingError, UnknownNodeError
from .graph import conv_geometry, consumers, find_node, infer_shapes, load_model, node_attributes
from .passes.op_table import keeps_grid

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Mask:
    """A perforation mask: ``array`` is bool [Ho, Wo], True where the output is computed."""

    array: np.ndarray
    kind: str = "custom"
    rate: float | None = None  # requested fraction skipped
    seed: int | None = None
    note: str = ""  # e.g. why a pooling mask fell back to uniform
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        array = _as_bool_array(self.array)
        if array.ndim != 2:
            raise MaskError(f"a mask must be 2-D [Ho, Wo], got shape {array.shape}")
        array.setflags(write=False)
        object.__setattr__(self, "array", array)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def computed(self) -> int:
        return int(self.array.sum())

    @property
    def achieved_rate(self) -> float:
        """Fraction of positions actually skipped."""
        return 1.0 - self.computed / self.array.size

    def __array__(self, dtype=None, copy=None):
        return self.array.astype(dtype) if dtype is not None else self.array.copy()

    def to_dict(self) -> dict:
        out = {
            "kind": self.kind,
            "shape": list(self.shape),
            "rate": self.rate,
            "achieved_rate": round(self.achieved_rate, 6),
            "computed": self.computed,
        }
        if self.seed is not None:
            out["seed"] = self.seed
        if self.note:
            out["note"] = self.note
        out.update(self.details)
        return out

    def __repr__(self) -> str:
        rate = "" if self.rate is None else f", rate={self.rate:g}"
        return f"Mask({self.kind}, shape={self.shape}{rate}, achieved_rate={self.achieved_rate:.4f})"


def _as_bool_array(value) -> np.ndarray:
    """Booleans, or numbers that are all 0 or 1; anything else (NaN, 0.5, strings, objects) would
    silently become True, so it is refused."""
    array = np.asarray(value)
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf":
        raise MaskError(f"a mask must hold booleans (or 0/1 numbers), got {array.dtype} values")
    if not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))].ravel()[0]
        raise MaskError(f"a mask must hold booleans (or 0/1 numbers), got the value {bad!r}")
    return array.astype(bool)


def as_mask(value) -> Mask:
    """A Mask from a Mask or an array-like of booleans (kind ``custom``)."""
    if isinstance(value, Mask):
        return value
    return Mask(np.asarray(value), kind="custom")


def _check(shape, rate) -> tuple[int, int]:
    try:
        shape = tuple(validation.integer(s, "a mask size") for s in shape)
        validation.rate(rate)
    except (SettingError, TypeError) as exc:  # TypeError: a shape that is not a sequence
        raise MaskError(f"{exc} (mask shape {shape!r}, rate {rate!r})") from None
    if len(shape) != 2:
        raise MaskError(f"mask shape must be two positive sizes [Ho, Wo], got {shape}")
    return shape  # type: ignore[return-value]


def computed_count(shape, rate) -> int:
    """How many positions a mask of ``shape`` at ``rate`` computes: round((1 - rate) * Ho * Wo), >= 1."""
    ho, wo = shape
    return max(1, int(round((1.0 - float(rate)) * ho * wo)))


def uniform(shape, rate: float, seed: int = 0) -> Mask:
    """Exactly ``computed_count(shape, rate)`` positions chosen uniformly at random with ``seed``."""
    shape = _check(shape, rate)
    count = computed_count(shape, rate)
    rng = np.random.default_rng(validation.integer(seed, "seed", minimum=0))
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    flat[rng.choice(flat.size, size=count, replace=False)] = True
    return Mask(flat.reshape(shape), kind="uniform", rate=float(rate), seed=int(seed))


def _lattice(size: int, stride: int) -> np.ndarray:
    """Positions 0..size-1 with the given stride, centred (the slack split evenly at both ends)."""
    count = -(-size // stride)
    start = (size - 1 - (count - 1) * stride) // 2
    return start + stride * np.arange(count)


def grid(shape, rate: float) -> Mask:
    """A regular lattice of computed positions with strides (sy, sx) chosen so that the kept fraction
    is closest to 1 - rate (ties: the most isotropic, then the smallest strides). The achieved rate
    may differ from the requested one: see ``Mask.achieved_rate``."""
    ho, wo = _check(shape, rate)
    target = 1.0 - float(rate)
    best = None
    for sy in range(1, ho + 1):
        ny = -(-ho // sy)
        for sx in range(1, wo + 1):
            nx = -(-wo // sx)
            kept = ny * nx / (ho * wo)
            score = (round(abs(kept - target), 12), abs(sy - sx), sy + sx)
            if best is None or score < best[0]:
                best = (score, sy, sx)
    _, sy, sx = best
    array = np.zeros((ho, wo), dtype=bool)
    array[np.ix_(_lattice(ho, sy), _lattice(wo, sx))] = True
    mask = Mask(array, kind="grid", rate=float(rate), details={"strides": [sy, sx]})
    if abs(mask.achieved_rate - rate) > 1e-9:
        log.info("grid mask %s: requested rate %.4f, achieved %.4f (strides %d x %d)",
                 mask.shape, rate, mask.achieved_rate, sy, sx)
    return mask


def pooling_weights(model, conv: str) -> tuple[np.ndarray, dict]:
    """For each output position of ``conv``, how many windows of the next MaxPool/AveragePool read it.

    Follows the Conv's output through the ops that keep its grid (``passes.op_table.keeps_grid``:
    activations, BN, Add/Mul, channel Concat, Dropout...) to the first pooling node. Raises
    :class:`PerforateError` when no such pooling follows.
    """
    model = load_model(model)
    node = find_node(model, conv)
    if node is None:
        raise UnknownNodeError(f"no node named {conv!r} (nor producing a tensor of that name)")
    geometry = conv_geometry(node, infer_shapes(model))
    ho, wo = geometry.out_hw
    uses = consumers(model)
    frontier, seen = [node.output[0]], set()
    while frontier:
        tensor = frontier.pop(0)
        for user in uses.get(tensor, []):
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type in ("MaxPool", "AveragePool"):
                return _window_counts((ho, wo), node_attributes(user)), {"pool": user.name or user.output[0]}
            if keeps_grid(user):
                frontier.extend(o for o in user.output[:1])
    raise PerforateError(
        f"Conv {geometry.key!r}: no MaxPool/AveragePool follows it through position-wise ops, "
        "so a pooling-structure mask is undefined"
    )


def _window_counts(hw, attrs) -> np.ndarray:
    kernel = attrs["kernel_shape"]
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    ceil_mode = int(attrs.get("ceil_mode", 0))
    counts = []
    for axis in range(2):
        size, k, s, d = hw[axis], kernel[axis], strides[axis], dilations[axis]
        effective = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = math.ceil(size / s)
            total = max((out - 1) * s + effective - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin = 0 if auto_pad == "VALID" else pads[axis]
            end = 0 if auto_pad == "VALID" else pads[axis + 2]
            span = size + begin + end - effective
            out = (math.ceil(span / s) if ceil_mode else span // s) + 1
        count = np.zeros(size, dtype=np.int64)
        for o in range(out):
            taps = o * s - begin + d * np.arange(k)
            taps = taps[(taps >= 0) & (taps < size)]
            np.add.at(count, taps, 1)
        counts.append(count)
    return np.outer(counts[0], counts[1])


def pooling_structure(model, conv: str, rate: float, *, seed: int = 0, fallback: bool = True) -> Mask:
    """Keep the positions read by the most windows of the pooling layer after ``conv`` (Figurnov et
    al.'s pooling-structure mask). Equal weights are ordered by a random permutation with ``seed``, so
    ties spread over the map instead of filling the top rows.

    When no pooling follows the Conv: with ``fallback=True`` (the default, so that a mask can be asked
    for every layer of a network) a ``uniform`` mask is returned, with a warning and a ``note``;
    otherwise :class:`PerforateError` is raised.
    """
    try:
        weights, details = pooling_weights(model, conv)
    except PerforateError as exc:
        if not fallback or "pooling-structure" not in str(exc):
            raise
        loaded = load_model(model)
        shape = conv_geometry(find_node(loaded, conv), infer_shapes(loaded)).out_hw
        log.warning("%s; using a uniform mask instead", exc)
        base = uniform(shape, rate, seed)
        return Mask(base.array, kind="uniform", rate=float(rate), seed=seed, note="no pooling follows: uniform fallback")
    shape = _check(weights.shape, rate)
    count = computed_count(shape, rate)
    tiebreak = np.random.default_rng(validation.integer(seed, "seed", minimum=0)).permutation(weights.size)
    order = np.lexsort((tiebreak, -weights.ravel()))  # by weight, descending, then the permutation
    flat = np.zeros(weights.size, dtype=bool)
    flat[order[:count]] = True
    return Mask(flat.reshape(shape), kind="pooling", rate=float(rate), seed=int(seed), details=details)


def from_array(array, kind: str = "custom") -> Mask:
    """Wrap a boolean array; raises EmptyMaskError if it computes nothing."""
    mask = Mask(np.asarray(array), kind=kind)
    if mask.computed == 0:
        raise EmptyMaskError("mask computes no position (all False)")
    return mask


def make(kind: str, shape, rate: float, *, seed: int = 0, model=None, conv: str | None = None) -> Mask:
    """Build a mask by kind name (``uniform``, ``grid``, ``pooling``): the CLI's entry point."""
    if kind == "uniform":
        return uniform(shape, rate, seed)
    if kind == "grid":
        return grid(shape, rate)
    if kind == "pooling":
        if model is None or conv is None:
            raise MaskError("a pooling-structure mask needs the model and the Conv's name")
        return pooling_structure(model, conv, rate, seed=seed)
    raise MaskError(f"unknown mask kind {kind!r}; expected uniform, grid or pooling")
