"""Mask kinds at equal perforation rates: uniform, grid, pooling structure, impact, iterative impact.

    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_masks.py squeezenet --rates 0.3 0.5 0.7 --threads 1
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_masks.py cifar --rates 0.3 0.5 0.7 --threads 1

Every Conv with a spatial kernel (``onnx_perforate.impact.spatial_convs``) is perforated at the same
rate r with each mask kind (Figurnov et al. 2016, Fig. 3-style comparison). Printed as Markdown, one
row per (r, kind):

- r achieved: the fraction of the perforated layers' MACs that is skipped (MAC-weighted mean of the
  per-layer achieved rates; grid lattices and tiny maps miss the requested rate);
- conv MAC reduction: all Conv MACs of the original / Conv MACs left, from ``inspect`` records
  (the perforated layers' MACs scaled by what they still compute; 1x1 Convs unchanged);
- speed-up: median latency of the original / of the perforated model in ONNX Runtime, all variants of
  one rate timed in interleaved rounds (``bench_models.latency``) after a warm-up;
- loss (NLL of the labels), top-1, top-5 on held-out evaluation data, and the change in top-5 error
  (bold: the lowest loss of the rate); calib. loss: the NLL on the calibration images the impact masks
  were estimated on (tells estimation noise from a real ranking).

Impact masks are estimated on calibration images that are disjoint from the evaluation images
(SqueezeNet: training-split samples1000, evaluated on val100; CIFAR-10: odd and even tenths of the
class-sorted test set).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_perforate  # noqa: E402
from onnx_perforate import masks as mask_kinds  # noqa: E402
from onnx_perforate.calibration import CalibrationSet  # noqa: E402
from onnx_perforate.data import PRESETS, load_folder  # noqa: E402
from onnx_perforate.impact import impact as impact_masks, spatial_convs  # noqa: E402
from onnx_perforate.tuning import as_probabilities  # noqa: E402  (the tuner's own loss, for comparable numbers)

from bench_models import latency, session  # noqa: E402

KINDS = ("uniform", "grid", "pooling", "impact", "iterative impact")


# ----------------------------------------------------------------------------------------------------
# Models and data


@dataclass
class Setup:
    """A model with its evaluation and calibration images."""

    name: str
    path: Path
    model: onnx.ModelProto
    evaluation: CalibrationSet
    calibration: CalibrationSet
    eval_batch: int  # batch size for accuracy runs (a fixed batch in the model forces 1)
    timing_batches: tuple  # batch sizes latency is measured at


def squeezenet(calibration_size: int = 128) -> Setup:
    """SqueezeNet 1.1: evaluate on val100, calibrate on evenly spaced training-split samples1000 images
    (one per class; sorted file order is the class index)."""
    folder = SHARED / "imagenet"
    path = folder / "squeezenet1.1.onnx"
    val = load_folder(folder / "val100", PRESETS["caffe"])
    evaluation = CalibrationSet("data_0", val.load(0, len(val)), val.labels)
    samples = load_folder(folder / "samples1000", PRESETS["caffe"])
    indices = np.unique(np.linspace(0, len(samples) - 1, calibration_size).round().astype(int))
    inputs = np.concatenate([samples.load(i, i + 1) for i in indices])
    calibration = CalibrationSet("data_0", inputs, indices.astype(np.int64))
    return Setup("squeezenet", path, onnx.load(str(path)), evaluation, calibration, 1, (1,))


def cifar(calibration_size: int = 256) -> Setup:
    """CIFAR-10 CNN. The npz is sorted by class, so both sets take every 10th image (balanced):
    evaluation from index 0, calibration from index 5 (disjoint), thinned evenly to ``calibration_size``."""
    folder = SHARED / "cifar10"
    path = folder / "cifar10_keras_cnn.onnx"
    with np.load(folder / "cifar10_test.npz") as archive:
        images = archive["images"].transpose(0, 3, 1, 2).astype(np.float32)  # NHWC uint8 -> NCHW float
        labels = archive["labels"].astype(np.int64)
    evaluation = CalibrationSet("input", images[0::10], labels[0::10])
    calibration = CalibrationSet("input", images[5::10], labels[5::10]).split(calibration_size)[0]
    return Setup("cifar", path, onnx.load(str(path)), evaluation, calibration, 100, (1, 32))


SETUPS = {"squeezenet": squeezenet, "cifar": cifar}


# ----------------------------------------------------------------------------------------------------
# Measurements


def evaluate(model: onnx.ModelProto, data: CalibrationSet, batch: int, threads: int = 2) -> dict:
    """NLL of the labels, top-1 and top-5 of ``model`` on ``data``."""
    sess = session(model, threads)
    probs = as_probabilities(np.concatenate([sess.run(None, feeds)[0] for feeds, _ in data.batches(batch)]))
    labels = data.labels
    ranks = np.argsort(-probs, axis=1)
    return {
        "loss": float(-np.log(probs[np.arange(len(probs)), labels]).mean()),
        "top1": float((ranks[:, 0] == labels).mean()),
        "top5": float((ranks[:, :5] == labels[:, None]).any(axis=1).mean()),
    }


def mac_summary(records: dict, masks: dict) -> tuple[float, float]:
    """(MAC-weighted achieved rate of the perforated layers, all-Conv MAC reduction) from inspect records."""
    total = sum(r.macs for r in records.values())
    perforated = sum(records[name].macs for name in masks)
    skipped = sum(records[name].macs * mask_kinds.as_mask(m).achieved_rate for name, m in masks.items())
    return skipped / max(perforated, 1), total / max(total - skipped, 1)


def build_masks(setup: Setup, kind: str, rate: float, *, impact_batch: int, threads: int) -> tuple[dict, list]:
    """{Conv: Mask} for every spatial Conv, and notes (pooling fallbacks)."""
    convs = spatial_convs(setup.model)
    shapes = {r.name: tuple(r.output_shape[2:]) for r in onnx_perforate.inspect(setup.model) if r.name in convs}
    if kind == "uniform":
        return {n: mask_kinds.uniform(shapes[n], rate, seed=0) for n in convs}, []
    if kind == "grid":
        return {n: mask_kinds.grid(shapes[n], rate) for n in convs}, []
    if kind == "pooling":
        masks = {n: mask_kinds.pooling_structure(setup.model, n, rate, seed=0) for n in convs}
        fallbacks = [n for n, m in masks.items() if m.note]
        return masks, ([f"pooling: {len(fallbacks)}/{len(masks)} layers have no pooling after them and use "
                        f"uniform masks ({', '.join(fallbacks)})"] if fallbacks else [])
    steps = 3 if kind == "iterative impact" else 1
    return impact_masks(setup.model, setup.calibration, rate, steps=steps, batch_size=impact_batch,
                             threads=threads), []


def compare(setup: Setup, rates, *, threads: int, repeats: int, impact_batch: int, log=print) -> dict:
    """Every (rate, kind): masks, accuracy and latency. Returns the rows and the baseline."""
    records = {r.name: r for r in onnx_perforate.inspect(setup.model) if r.perforable}
    baseline = evaluate(setup.model, setup.evaluation, setup.eval_batch)
    # The loss on the calibration images too: it tells estimation noise from overfitting to them.
    baseline["calib_loss"] = evaluate(setup.model, setup.calibration, setup.eval_batch)["loss"]
    rows, notes = [], []
    for rate in rates:
        models = {"original": setup.model}
        for kind in KINDS:
            started = time.perf_counter()
            masks, kind_notes = build_masks(setup, kind, rate, impact_batch=impact_batch, threads=2)
            notes += [f"r={rate:g} {note}" for note in kind_notes]
            models[kind] = onnx_perforate.rewrite(setup.model, masks)
            achieved, reduction = mac_summary(records, masks)
            row = dict(kind=kind, rate=rate, achieved=achieved, mac_reduction=reduction,
                       **evaluate(models[kind], setup.evaluation, setup.eval_batch),
                       calib_loss=evaluate(models[kind], setup.calibration, setup.eval_batch)["loss"],
                       masks_s=time.perf_counter() - started)
            rows.append(row)
            log(f"  r={rate:g} {kind}: loss {row['loss']:.3f} top-1 {row['top1']:.3f} ({row['masks_s']:.1f} s)")
        # All kinds of one rate and the original take turns, so load drifts hit them alike.
        for batch in setup.timing_batches:
            times, _ = latency(models, threads, batch, repeats)  # wall-clock ms per variant
            baseline[f"ms_b{batch}"] = times["original"]  # last rate's measurement; printed for scale
            for row in rows[-len(KINDS):]:
                row[f"speedup_b{batch}"] = times["original"] / times[row["kind"]]
                row[f"ms_b{batch}"] = times[row["kind"]]
            log(f"  r={rate:g} batch {batch}: original {times['original']:.2f} ms")
    return {"rows": rows, "baseline": baseline, "notes": notes}


# ----------------------------------------------------------------------------------------------------
# Output


def markdown(setup: Setup, result: dict, threads: int) -> str:
    base, rows = result["baseline"], result["rows"]
    batches = setup.timing_batches
    speed_cols = " | ".join(f"speed-up b{b}" for b in batches)
    lines = [
        f"original: loss {base['loss']:.3f} (calibration images {base['calib_loss']:.3f}), top-1 {base['top1']:.3f}, top-5 {base['top5']:.3f} on "
        f"{len(setup.evaluation)} evaluation images; latency at {threads} thread(s): "
        + ", ".join(f"batch {b} {base[f'ms_b{b}']:.2f} ms" for b in batches)
        + f"; {len(setup.calibration)} calibration images",
        "",
        f"| kind | r | r achieved | conv MAC reduction | {speed_cols} | loss | top-1 | top-5 | Δ top-5 error | calib. loss |",
        "|---|---|---|---|" + "---|" * len(batches) + "---|---|---|---|---|",
    ]
    for rate in sorted({r["rate"] for r in rows}):
        group = [r for r in rows if r["rate"] == rate]
        best = min(group, key=lambda r: r["loss"])
        for r in group:
            speed = " | ".join(f"{r[f'speedup_b{b}']:.2f}x" for b in batches)
            loss = f"**{r['loss']:.3f}**" if r is best else f"{r['loss']:.3f}"
            delta = (base["top5"] - r["top5"]) * 100
            lines.append(f"| {r['kind']} | {rate:g} | {r['achieved']:.3f} | {r['mac_reduction']:.2f}x | {speed} | "
                         f"{loss} | {r['top1']:.3f} | {r['top5']:.3f} | {delta:+.1f} pp | "
                         f"{r['calib_loss']:.3f} |")
    lines.append("")
    for rate in sorted({r["rate"] for r in rows}):
        group = sorted((r for r in rows if r["rate"] == rate), key=lambda r: r["loss"])
        impact_best = group[0]["kind"] in ("impact", "iterative impact")
        lines.append(f"- r={rate:g}: lowest loss {group[0]['kind']} ({group[0]['loss']:.3f}), then "
                     + ", ".join(f"{r['kind']} {r['loss']:.3f}" for r in group[1:])
                     + ("" if impact_best else " — **an impact mask is NOT the lowest-loss kind here**"))
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(SETUPS))
    p.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for timing (default 1)")
    p.add_argument("--repeats", type=int, default=40, help="interleaved timing rounds per batch size")
    p.add_argument("--calibration", type=int, help="calibration images (default: 128 SqueezeNet, 256 CIFAR)")
    p.add_argument("--impact-batch", type=int, default=16)
    args = p.parse_args(argv)
    if not onnx_perforate.has_library():
        print("needs the compiled custom-op library (ONNX_PERFORATE_LIBRARY)", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.ERROR)  # pooling fallbacks are reported in the notes instead
    started = time.perf_counter()
    setup = SETUPS[args.model](*([args.calibration] if args.calibration else []))
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = compare(setup, args.rates, threads=args.threads, repeats=args.repeats,
                     impact_batch=args.impact_batch, log=progress)
    print(f"## {setup.path.name}: every spatial Conv ({len(spatial_convs(setup.model))}) perforated\n")
    print(markdown(setup, result, args.threads))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
