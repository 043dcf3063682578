"""Recovery recipes compared on fixed perforated models (the same masks for every recipe).

    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_recipes.py --save /tmp/cifar_2x.onnx \
        --recipe epochs=12 --recipe epochs=12,augment=flip+crop+mixup
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_recipes.py --perforated /tmp/cifar_2x.onnx \
        --recipe epochs=12,learning_rate=0.003
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_recipes.py --model fashion \
        --perforated run1/model.onnx --perforated run2/model.onnx --recipe temperature=1 --recipe temperature=4
    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/compare_recipes.py --model squeezenet --grid 0.5 \
        --recipe epochs=8,temperature=1 --recipe epochs=8,temperature=4

``--model`` picks the network and its split (recover_models.py's ``setup``): ``cifar`` (default) recovers
on the 5000 even-indexed test images (4000 train, every fifth, 1000, for early stopping) and evaluates on
the 5000 odd-indexed ones; ``fashion`` is the main job's split (500 evenly spaced bundled images recover,
the other 500 evaluate); ``squeezenet`` recovers on the 500 even-indexed ``samples1000`` images and
evaluates on the 500 odd-indexed ones. Neither the tuner nor the recovery sees the evaluation images.

The perforated models: each ``--perforated`` file's masks applied to the original afresh (a model recovered
before starts again from the original's weights), or ``--grid RATE`` (grid masks on every spatial Conv),
or else one tuner run as in recover_models.py (its calibration images, target ``--point``, the setup's
timing batch, one thread, no accuracy budget; the step whose predicted speed-up is nearest ``--point``;
``--save`` keeps it, so that later recipes recover the same masks: the tuner's path follows the timings of
the moment). Each recipe (``KEY=VALUE,...`` options of :func:`onnx_perforate.finetune`, values read as JSON
where they parse; method ``distill`` unless given) recovers every model. The training loss is measured on
augmented images, the held-out KL on plain ones; agreement is with the original's top-1 on the evaluation
images. Prints a Markdown table; ``--out`` appends one JSON line per recipe and model.
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

from onnx_perforate import finetune, inspect, masks, rewrite, runtime, tune  # noqa: E402
from onnx_perforate.finetune import perforation_masks  # noqa: E402
from onnx_perforate.impact import spatial_convs  # noqa: E402


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


def scores(model, data) -> np.ndarray:
    """The model's outputs [N, K] on the evaluation images (one thread)."""
    session = runtime.session(model, 1)
    name = session.get_inputs()[0].name
    step = runtime.model_input(model).fixed_batch or 32
    return np.concatenate([session.run(None, {name: data.inputs[i:i + step]})[0]
                           for i in range(0, len(data), step)]).reshape(len(data), -1)


def top1(outputs, data) -> float:
    return float((outputs.argmax(1) == data.labels).mean())


def agreement(outputs, reference) -> float:
    return float((outputs.argmax(1) == reference.argmax(1)).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", type=recipe, required=True,
                        help="KEY=VALUE,... options of finetune (repeat for several recipes)")
    parser.add_argument("--model", choices=["cifar", "fashion", "squeezenet"], default="cifar")
    parser.add_argument("--perforated", action="append",
                        help="a perforated model of --model whose masks are recovered (repeatable; default: tune one)")
    parser.add_argument("--grid", type=float, metavar="RATE", help="grid masks at RATE on every spatial Conv")
    parser.add_argument("--point", type=float, default=2.1, help="the tuner step nearest this predicted speed-up")
    parser.add_argument("--save", help="write the tuned model here")
    parser.add_argument("--timing-cpu", type=int, help="run the tuner on this core alone, holding the lock")
    parser.add_argument("--out", help="append the results here, one JSON line per recipe")
    args = parser.parse_args()
    original, calibration, recovery, evaluation, batch = setup(args.model, 5000)
    if args.perforated:
        models = {path: rewrite(original, perforation_masks(onnx.load(path), original)) for path in args.perforated}
    elif args.grid is not None:
        shapes = {r.name: tuple(r.output_shape[2:]) for r in inspect(original)}
        grids = {name: np.asarray(masks.grid(shapes[name], args.grid), bool) for name in spatial_convs(original)}
        models = {f"grid r={args.grid:g}": rewrite(original, grids)}
    else:
        with bench_lock(args.timing_cpu):
            tuned = tune(original, calibration, target_speedup=args.point, max_accuracy_drop=1.0, threads=1,
                         timing_batch=batch, subset_size=None, baselines=False, progress=True, repeats=10)
        step = min(tuned.steps[1:], key=lambda s: abs(s.speedup - args.point))
        models = {f"tuner step {step.step}": tuned.model_at(original, step.step)}
        print(f"tuner: step {step.step}, {step.speedup:.2f}x predicted", flush=True)
        if args.save:
            onnx.save(models[f"tuner step {step.step}"], args.save)
    reference = scores(original, evaluation)
    print(f"original top-1 {top1(reference, evaluation):.3f} ({len(evaluation)} evaluation images)")
    before = {}
    for name, perforated in models.items():
        out = scores(perforated, evaluation)
        before[name] = (agreement(out, reference), top1(out, evaluation))
        print(f"{name}: agreement {before[name][0]:.3f}, top-1 {before[name][1]:.3f} before recovery")
    print("\n| recipe | perforated model | best epoch | train loss | held-out KL | agreement | top-1 | s |")
    print("|---|---|---|---|---|---|---|---|")
    for options in args.recipe:
        options = dict({"method": "distill"}, **options)
        for name, perforated in models.items():
            started = time.perf_counter()
            result = finetune(perforated, original, recovery, threads=1, progress=False, **options)
            seconds = time.perf_counter() - started
            best = result.history[result.settings.get("best_epoch", 0)]
            out = scores(result.model, evaluation)
            row = dict(recipe=options, model=name, best_epoch=result.settings.get("best_epoch"),
                       train_loss=best.get("train_loss"), holdout_kl=result.after["loss"],
                       agreement_before=before[name][0], top1_before=before[name][1],
                       agreement=agreement(out, reference), top1=top1(out, evaluation), seconds=round(seconds),
                       history=result.history)
            train = "" if row["train_loss"] is None else f"{row['train_loss']:.3f}"
            print(f"| {','.join(f'{k}={v}' for k, v in options.items())} | {name} | {row['best_epoch']} | {train} | "
                  f"{row['holdout_kl']:.3f} | {row['agreement']:.3f} | {row['top1']:.3f} | {row['seconds']} |",
                  flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
