"""Is a perforated model worth deploying? Recovery methods against a smaller input and INT8.

    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/recover_models.py cifar --out docs/results
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/recover_models.py squeezenet --distill-at 1.5
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/recover_models.py fashion

One greedy tuner run per model (to ``--target``, no accuracy budget (1.0), timed at the setup's batch with one
thread) gives the perforated models at about 1.25x, 1.5x and 2x (the steps whose predicted speed-up is
nearest). Each is then recovered by every method of :func:`onnx_perforate.finetune` on the fine-tuning
images, and every model is measured on held-out images the tuner and the recovery never saw, beside
the original fed smaller images (``tuning.resize_baseline``) and ORT's ``quantize_static`` (QDQ,
per-channel INT8), all timed in the same interleaved rounds (median per model, one thread).

Splits (the data sets are sorted by class: every split interleaves):
- cifar: calibration and fine-tuning on even-indexed test images (the tuner uses 500 of them, the
  recovery 2500), evaluation on the 5000 odd-indexed ones. Timing batch 32.
- squeezenet: samples1000, even-indexed images (500) to tune and recover, unlabelled (distillation
  only); evaluation on the 500 odd-indexed ones (agreement with the original; top-1 against the
  file's class, a training-split image). Timing batch 1.
- fashion: the bundled subset, the main job's split (500 evenly spaced images calibrate and recover,
  the other 500 evaluate). Timing batch 32.

Timing holds /tmp/onnx_perforate_bench.lock (the machine is shared). Prints Markdown tables and writes
``<model>_recovery.json`` and ``<model>_recovery.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_perforate import finetune, tune  # noqa: E402
from onnx_perforate.calibration import CalibrationSet  # noqa: E402
from onnx_perforate.tuning import resize_baseline  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
LOCK = "/tmp/onnx_perforate_bench.lock"
POINTS = (1.25, 1.5, 2.0)


@contextmanager
def bench_lock(cpu=None):
    """Holds the benchmark lock; with ``cpu``, runs on that core alone meanwhile (the training around the
    timed parts may run on another, shared one)."""
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        cores = os.sched_getaffinity(0)
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            yield
        finally:
            os.sched_setaffinity(0, cores)
            fcntl.flock(handle, fcntl.LOCK_UN)


def setup(name, finetune_images=None):
    """(original, tune calibration, fine-tuning data, evaluation data, timing batch)."""
    if name == "cifar":
        path = SHARED / "cifar10" / "cifar10_keras_cnn.onnx"
        with np.load(SHARED / "cifar10" / "cifar10_test.npz") as archive:
            x = archive["images"].transpose(0, 3, 1, 2).astype(np.float32)
            y = archive["labels"].astype(np.int64)
        even = CalibrationSet("input", x[0::2], y[0::2])
        return (onnx.load(path), even.split(500)[0], even.split(finetune_images or 2500)[0],
                CalibrationSet("input", x[1::2], y[1::2]), 32)
    if name == "squeezenet":
        from onnx_perforate.data import PRESETS, load_folder

        path = SHARED / "imagenet" / "squeezenet1.1.onnx"
        samples = load_folder(SHARED / "imagenet" / "samples1000", PRESETS["caffe"])
        x = samples.load(0, len(samples))
        labels = np.arange(len(samples), dtype=np.int64)  # one image per class, in class order
        tune_set = CalibrationSet("data_0", x[0::2], None)
        return (onnx.load(path), tune_set.split(256)[0], tune_set, CalibrationSet("data_0", x[1::2], labels[1::2]), 1)
    if name == "fashion":
        path = ROOT / "sample_models" / "fashion_cnn.onnx"
        with np.load(ROOT / "sample_models" / "fashion_mnist_subset.npz") as archive:
            data = CalibrationSet("image", archive["images"].astype(np.float32), archive["labels"].astype(np.int64))
        calibration, evaluation = data.split(500)
        return onnx.load(path), calibration, calibration, evaluation, 32
    raise SystemExit(f"unknown model {name!r}")


def quantized(original, calibration: CalibrationSet):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{calibration.input_name: calibration.inputs[i:i + 1]}
                               for i in range(min(len(calibration), 128))])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, target = (str(Path(tmp) / n) for n in ("m.onnx", "p.onnx", "q.onnx"))
        onnx.save(original, source)
        try:
            quant_pre_process(source, prepared)
        except Exception:  # pre-processing is an optimisation only
            prepared = source
        quantize_static(prepared, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["cifar", "squeezenet", "fashion"])
    parser.add_argument("--target", type=float, default=2.1, help="tuner target (default 2.1)")
    parser.add_argument("--points", type=float, nargs="+", default=POINTS)
    parser.add_argument("--distill-at", type=float, nargs="*",
                        help="distill only at these points (default: all; distillation is the slow method)")
    parser.add_argument("--distill-budget", type=float, help="seconds per distillation (default: no limit)")
    parser.add_argument("--epochs", type=int, help="distillation epochs (default: finetune's)")
    parser.add_argument("--augment", help="distillation augmentation (default: finetune's), e.g. flip+crop+mixup")
    parser.add_argument("--weight-decay", type=float, help="distillation weight decay (default: finetune's)")
    parser.add_argument("--label-weight", type=float, help="the labels' share of the target (default: finetune's)")
    parser.add_argument("--finetune-images", type=int,
                        help="cifar: how many even-indexed images recover (default 2500; at most 5000)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds (default 20)")
    parser.add_argument("--include-1x1", action="store_true", help="let the tuner perforate 1x1 Convs too")
    parser.add_argument("--methods", nargs="+", help="recovery methods (default: bias_correction, bn_reestimation "
                        "where the model has BatchNorm, distill)")
    parser.add_argument("--timing-cpu", type=int, help="run the timed parts (the tuner, the final timing) on this "
                        "core alone, holding the lock (default: wherever the process runs)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    original, calibration, finetune_data, evaluation, batch = setup(args.model, args.finetune_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    with bench_lock(args.timing_cpu):
        tuned = tune(original, calibration, target_speedup=args.target, max_accuracy_drop=1.0, threads=1,
                     timing_batch=batch, subset_size=None, baselines=False, progress=True, repeats=10,
                     include_1x1=args.include_1x1)
    tune_s = time.perf_counter() - started
    print(f"tuner: {tuned.stopped}, {len(tuned.steps) - 1} steps, {tune_s:.0f} s", flush=True)

    chosen = []
    for point in args.points:
        step = min(tuned.steps[1:], key=lambda s: abs(s.speedup - point))
        if step.step not in [s.step for _, s in chosen]:
            chosen.append((point, step))
    models, rows = {}, []
    has_bn = any(n.op_type == "BatchNormalization" for n in original.graph.node)
    for point, step in chosen:
        perforated = tuned.model_at(original, step.step)
        label = f"{point:g}x/none"
        models[label] = perforated
        rows.append(dict(point=point, step=step.step, predicted=step.speedup, method="none", seconds=0.0,
                         label=label))
        methods = args.methods or ["bias_correction"] + (["bn_reestimation"] if has_bn else []) + ["distill"]
        if args.distill_at is not None and not any(abs(point - p) < 1e-9 for p in args.distill_at):
            methods = [m for m in methods if "distill" not in m]
        for method in methods:
            begin = time.perf_counter()
            options = {key: value for key, value in (("epochs", args.epochs), ("augment", args.augment),
                                                     ("weight_decay", args.weight_decay),
                                                     ("label_weight", args.label_weight)) if value is not None}
            result = finetune(perforated, original, finetune_data, method=method, threads=1, progress=True,
                              time_budget_s=args.distill_budget, **options)
            label = f"{point:g}x/{method}"
            models[label] = result.model
            rows.append(dict(point=point, step=step.step, predicted=step.speedup, method=method,
                             seconds=time.perf_counter() - begin, label=label, improved=result.improved,
                             epochs=result.settings.get("best_epoch")))
            print(f"{label}: {result.summary()} ({rows[-1]['seconds']:.0f} s)", flush=True)
    try:
        models["int8"] = quantized(original, calibration)
    except Exception as error:  # report, do not hide, a quantizer failure
        print(f"quantize_static failed: {error}")
    with bench_lock(args.timing_cpu):
        baseline = resize_baseline(original, evaluation, threads=1, batch_size=batch if batch > 1 else 1,
                                   timing_batch=batch, repeats=args.repeats, models=models)
    report = dict(model=args.model, tune_seconds=tune_s, tuner_stopped=tuned.stopped, rows=rows,
                  baseline=baseline, command=" ".join(sys.argv[1:]))
    (out / f"{args.model}_recovery.json").write_text(json.dumps(report, indent=2, default=float))
    print_tables(report)
    plot(report, out / f"{args.model}_recovery.png")
    return 0


def print_tables(report) -> None:
    b = report["baseline"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\nheld-out {b['data_images']} images; speed-ups timed interleaved (1 thread), tuner "
          f"{report['tune_seconds']:.0f} s\n")
    print("| point | step | method | speed-up | top-1 | agreement | loss | time s |")
    print("|---|---|---|---|---|---|---|---|")
    o = b["original"]
    print(f"| original | | | 1.00x | {fmt(o['top1'])} | 1.000 | {o['loss']:.4f} | |")
    for r in report["rows"]:
        m = b["models"][r["label"]]
        note = "" if r.get("improved", True) else " (no gain: input kept)"
        print(f"| ~{r['point']:g}x | {r['step']} | {r['method']}{note} | {m['speedup']:.2f}x | {fmt(m['top1'])} | "
              f"{m['agreement']:.3f} | {m['loss']:.4f} | {r['seconds']:.0f} |")
    for p in b["points"]:
        print(f"| resize | | input {p['size'][0]}x{p['size'][1]} | {p['speedup']:.2f}x | {fmt(p['top1'])} | "
              f"{p['agreement']:.3f} | {p['loss']:.4f} | |")
    if not b["available"]:
        print(f"| resize | | not possible: {b['reason']} | | | | | |")
    if "int8" in b["models"]:
        m = b["models"]["int8"]
        print(f"| INT8 | | quantize_static QDQ per-channel | {m['speedup']:.2f}x | {fmt(m['top1'])} | "
              f"{m['agreement']:.3f} | {m['loss']:.4f} | |")


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = report["baseline"]
    key = "top1" if b["original"]["top1"] is not None and report["model"] != "squeezenet" else "agreement"
    fig, ax = plt.subplots(figsize=(6, 4))
    resize = [b["original"]] + b["points"]
    ax.plot([p["speedup"] for p in resize], [p[key] for p in resize], "s-", color="C7", label="smaller input")
    markers = {"none": ("o", "C0"), "bias_correction": ("v", "C1"), "bn_reestimation": ("^", "C4"),
               "distill": ("*", "C2")}
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    for number, method in enumerate(methods):
        marker, color = markers.get(method, ("P", f"C{5 + number % 4}"))
        pts = [b["models"][r["label"]] for r in report["rows"] if r["method"] == method]
        if pts:
            ax.plot([p["speedup"] for p in pts], [p[key] for p in pts], marker, color=color, markersize=9,
                    label=f"perforated, {method}")
    if "int8" in b["models"]:
        m = b["models"]["int8"]
        ax.plot([m["speedup"]], [m[key]], "D", color="C3", label="INT8 (reference)")
    ax.set_xlabel("speed-up, timed interleaved, 1 thread (x)")
    ax.set_ylabel(f"held-out {'top-1' if key == 'top1' else 'agreement with the original'}")
    ax.set_title(f"{report['model']}: recovery vs smaller input")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
