"""Recovery recipes compared on one perforated CIFAR-10 CNN (the same masks for every recipe).

    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_recipes.py --save /tmp/cifar_2x.onnx \
        --recipe epochs=12 --recipe epochs=12,augment=flip+crop+mixup
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_recipes.py --perforated /tmp/cifar_2x.onnx \
        --recipe epochs=12,learning_rate=0.003

The perforated model comes from ``--perforated`` or from one tuner run as in recover_models.py (500
even-indexed test images calibrate, target 2.1, timing batch 32, one thread, no accuracy budget; the step
whose predicted speed-up is nearest ``--point``; ``--save`` keeps it, so that later recipes recover the
same masks: the tuner's path follows the timings of the moment). Each recipe (``KEY=VALUE,...`` options
of :func:`onnx_perforate.finetune`, values read as JSON where they parse; method ``distill`` unless
given) recovers it on the 5000 even-indexed test images (4000 train, every fifth, 1000, for early
stopping) and is evaluated on the 5000 odd-indexed ones, which neither the tuner nor the recovery saw.
The training loss is measured on augmented images, the held-out KL on plain ones. Prints a Markdown
table; ``--out`` appends one JSON line per recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from recover_models import bench_lock, setup  # noqa: E402

from onnx_perforate import finetune, runtime, tune  # noqa: E402


def recipe(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--recipe takes KEY=VALUE,... options of finetune, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return options


def top1(model, data) -> float:
    session = runtime.session(model, 1)
    name = session.get_inputs()[0].name
    scores = np.concatenate([session.run(None, {name: data.inputs[i:i + 32]})[0]
                             for i in range(0, len(data), 32)])
    return float((scores.reshape(len(data), -1).argmax(1) == data.labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", type=recipe, required=True,
                        help="KEY=VALUE,... options of finetune (repeat for several recipes)")
    parser.add_argument("--perforated", help="a perforated model of the CIFAR CNN (default: tune one)")
    parser.add_argument("--point", type=float, default=2.1, help="the tuner step nearest this predicted speed-up")
    parser.add_argument("--save", help="write the tuned model here")
    parser.add_argument("--timing-cpu", type=int, help="run the tuner on this core alone, holding the lock")
    parser.add_argument("--out", help="append the results here, one JSON line per recipe")
    args = parser.parse_args()
    original, calibration, recovery, evaluation, batch = setup("cifar", 5000)
    if args.perforated:
        perforated = onnx.load(args.perforated)
    else:
        with bench_lock(args.timing_cpu):
            tuned = tune(original, calibration, target_speedup=args.point, max_accuracy_drop=1.0, threads=1,
                         timing_batch=batch, subset_size=None, baselines=False, progress=True, repeats=10)
        step = min(tuned.steps[1:], key=lambda s: abs(s.speedup - args.point))
        perforated = tuned.model_at(original, step.step)
        print(f"tuner: step {step.step}, {step.speedup:.2f}x predicted", flush=True)
        if args.save:
            onnx.save(perforated, args.save)
    before = top1(perforated, evaluation)
    print(f"original top-1 {top1(original, evaluation):.3f}, perforated {before:.3f} "
          f"({len(evaluation)} odd-indexed images)\n")
    print("| recipe | best epoch | train loss | held-out KL | top-1 (odd) | s |")
    print("|---|---|---|---|---|---|")
    for options in args.recipe:
        options = dict({"method": "distill"}, **options)
        started = time.perf_counter()
        result = finetune(perforated, original, recovery, threads=1, progress=False, **options)
        seconds = time.perf_counter() - started
        best = result.history[result.settings.get("best_epoch", 0)]
        row = dict(recipe=options, best_epoch=result.settings.get("best_epoch"), train_loss=best.get("train_loss"),
                   holdout_kl=result.after["loss"], top1_before=before, top1=top1(result.model, evaluation),
                   seconds=round(seconds), history=result.history)
        train = "" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
        print(f"| {','.join(f'{k}={v}' for k, v in options.items())} | {row['best_epoch']} | {train} | "
              f"{row['holdout_kl']:.3f} | {row['top1']:.3f} | {row['seconds']} |", flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
