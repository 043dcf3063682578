"""The greedy perforation tuner on SqueezeNet 1.1 or the CIFAR-10 CNN, checked on held-out data.

    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/tune_models.py squeezenet --target 2.2 --max-minutes 15
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/tune_models.py cifar --target 2.0

Runs ``onnx_perforate.tune`` (impact masks, cost (L - L0) / (t0 - t)) on the calibration images of
``compare_masks.py`` (SqueezeNet: evenly spaced samples1000 images; CIFAR-10: every 10th test image
from index 5), then rebuilds several points of its trade-off curve with ``TuneResult.model_at`` and
measures each on the held-out evaluation images (val100; every 10th CIFAR-10 test image from index 0)
and in ONNX Runtime (interleaved timing, ``bench_models.latency``). Prints Markdown: the tuner's own
curve (calibration data, its timing) and the held-out table; writes the tuner's tradeoff.png and
masks.png, and a held-out accuracy plot, to ``--plots`` with model-specific names.

``--max-minutes`` stops the search after that long (the tuner returns the steps found so far, as on
Ctrl-C).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_perforate  # noqa: E402
from onnx_perforate.impact import spatial_convs  # noqa: E402

from bench_models import latency  # noqa: E402
from compare_masks import SETUPS, evaluate, mac_summary  # noqa: E402

DEFAULT_TARGET = {"squeezenet": 2.2, "cifar": 2.0}
# The batch size the tuner times at. SqueezeNet's batch is fixed at 1. For CIFAR, one image takes about
# a millisecond and its timings are noisy; batch 32 ranks the candidates more reliably.
DEFAULT_TIMING_BATCH = {"squeezenet": 1, "cifar": 32}


def candidate_layers(setup, extra: list[str]) -> list[str]:
    """Spatial Convs whose output has more than one position (a 1x1 map cannot be perforated), plus
    ``extra`` (e.g. a 1x1 Conv such as SqueezeNet's conv10_1 classifier)."""
    shapes = {r.name: r.output_shape[2:] for r in onnx_perforate.inspect(setup.model)}
    spatial = [n for n in spatial_convs(setup.model) if shapes[n][0] * shapes[n][1] > 1]
    return spatial + [n for n in extra if n not in spatial]


def pick_steps(count: int, points: int) -> list[int]:
    """``points`` evenly spaced step indices of a curve of ``count`` steps, always the first and last."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(points, count))})


def stop_after(minutes: float | None) -> None:
    """Deliver a KeyboardInterrupt after ``minutes``: the tuner then returns the steps found so far."""
    if not minutes:
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(int(minutes * 60))


def held_out(setup, result, steps, *, threads: int, repeats: int) -> list[dict]:
    """Accuracy on the evaluation images and measured speed-up of the chosen steps of the curve."""
    records = {r.name: r for r in onnx_perforate.inspect(setup.model) if r.perforable}
    models = {"original": setup.model}
    rows = []
    for step in steps:
        model = result.model_at(setup.model, step)
        masks = result.step_masks[step]
        achieved, reduction = mac_summary(records, masks) if masks else (0.0, 1.0)
        models[f"step {step}"] = model
        tuned = result.steps[step]
        rows.append(dict(step=step, layers=len(masks), tuner_speedup=tuned.speedup, calib_loss=tuned.loss,
                         mac_reduction=reduction, **evaluate(model, setup.evaluation, setup.eval_batch)))
    for batch in setup.timing_batches:
        times, _ = latency(models, threads, batch, repeats)  # wall-clock ms per variant
        for row in rows:
            row[f"speedup_b{batch}"] = times["original"] / times[f"step {row['step']}"]
            row[f"ms_b{batch}"] = times[f"step {row['step']}"]
        rows[0][f"original_ms_b{batch}"] = times["original"]
    return rows


def held_out_table(setup, rows) -> str:
    base = rows[0]  # step 0 is the original network
    batches = setup.timing_batches
    lines = [f"| step | perforated layers | tuner speed-up (calib.) | " + " | ".join(f"speed-up b{b}" for b in batches)
             + " | conv MAC reduction | calib. loss | loss | top-1 | top-5 | Δ top-5 error |",
             "|---|---|---|" + "---|" * len(batches) + "---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['layers']} | {r['tuner_speedup']:.2f}x | "
                     + " | ".join(f"{r[f'speedup_b{b}']:.2f}x" for b in batches)
                     + f" | {r['mac_reduction']:.2f}x | {r['calib_loss']:.3f} | {r['loss']:.3f} | {r['top1']:.3f} | "
                       f"{r['top5']:.3f} | {(base['top5'] - r['top5']) * 100:+.1f} pp |")
    return "\n".join(lines)


def plot_held_out(setup, rows, path: Path) -> None:
    """Top-1 / top-5 on the evaluation images against the measured speed-up at the largest timing batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = setup.timing_batches[-1]
    speed = [r[f"speedup_b{batch}"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(speed, [r["top1"] for r in rows], "o-", label="top-1")
    ax.plot(speed, [r["top5"] for r in rows], "s-", label="top-5")
    for r, x in zip(rows, speed):
        ax.annotate(str(r["step"]), (x, r["top1"]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xlabel(f"measured speed-up in ONNX Runtime (batch {batch})")
    ax.set_ylabel(f"accuracy on {len(setup.evaluation)} held-out images")
    ax.set_title(f"{setup.name}: greedy tuner, held-out accuracy (labels: step)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(SETUPS))
    p.add_argument("--target", type=float, help="target speed-up (default: 2.2 SqueezeNet, 2.0 CIFAR)")
    p.add_argument("--ladder", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.65, 0.8])
    p.add_argument("--extra-layers", nargs="*", default=[],
                   help="1x1 Convs to tune besides the spatial ones (e.g. conv10_1)")
    p.add_argument("--calibration", type=int, help="calibration images (default: 128 SqueezeNet, 256 CIFAR)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, for the tuner's and our timing")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per candidate inside the tuner")
    p.add_argument("--timing-batch", type=int, help="batch the tuner times at (default: 1 SqueezeNet, 32 CIFAR)")
    p.add_argument("--points", type=int, default=7, help="points of the curve to evaluate on held-out data")
    p.add_argument("--eval-repeats", type=int, default=40, help="interleaved timing rounds for those points")
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--tag", help="prefix of the plot files (default: the model's name)")
    args = p.parse_args(argv)
    if not onnx_perforate.has_library():
        print("needs the compiled custom-op library (ONNX_PERFORATE_LIBRARY)", file=sys.stderr)
        return 1

    setup = SETUPS[args.model](*([args.calibration] if args.calibration else []))
    layers = candidate_layers(setup, args.extra_layers)
    target = args.target or DEFAULT_TARGET[args.model]
    started = time.perf_counter()
    stop_after(args.max_minutes)
    result = onnx_perforate.tune(
        setup.model, setup.calibration, target_speedup=target, ladder=args.ladder, layers=layers,
        include_1x1=bool(args.extra_layers), subset_size=None, threads=args.threads, repeats=args.repeats,
        timing_batch=args.timing_batch or DEFAULT_TIMING_BATCH[args.model])
    signal.alarm(0)
    tune_s = time.perf_counter() - started

    print(f"## Greedy tuner on {setup.path.name}\n")
    print(f"{len(layers)} candidate layers ({', '.join(layers)}); ladder {args.ladder}; target {target:g}x; "
          f"{len(setup.calibration)} calibration images; {args.threads} thread(s), timing batch "
          f"{result.settings['timing_batch']}\n")
    print(f"{result.summary()}\n\ntuner wall time: {tune_s:.0f} s\n")
    print("### The tuner's curve (calibration images, the tuner's own timing)\n")
    print(result.table())

    steps = pick_steps(len(result.steps), args.points)
    rows = held_out(setup, result, steps, threads=args.threads, repeats=args.eval_repeats)
    print(f"\n### Points of the curve on {len(setup.evaluation)} held-out images, re-timed (interleaved, "
          f"{args.threads} thread(s))\n")
    print("original latency: " + ", ".join(f"batch {b} {rows[0][f'original_ms_b{b}']:.2f} ms"
                                            for b in setup.timing_batches) + "\n")
    print(held_out_table(setup, rows))
    final = result.masks
    print("\nfinal rates: " + ", ".join(f"{n} {m.achieved_rate:.2f}" for n, m in final.items()))

    args.plots.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.model
    with tempfile.TemporaryDirectory() as tmp:
        saved = result.save(tmp)
        for key in ("plot", "masks"):
            target_path = args.plots / f"{tag}_{'tradeoff' if key == 'plot' else 'masks'}.png"
            shutil.copyfile(saved[key], target_path)
    plot_held_out(setup, rows, args.plots / f"{tag}_heldout.png")
    for png in (args.plots / f"{tag}_{kind}.png" for kind in ("tradeoff", "masks", "heldout")):
        print(f"wrote {png.relative_to(ROOT)} ({png.stat().st_size // 1024} KB)")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
