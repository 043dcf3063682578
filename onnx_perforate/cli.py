"""``onnx-perforate`` / ``python -m onnx_perforate``: inspect, perforate, bench and eval (docs/cli.md)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import statistics
import sys
from pathlib import Path

import numpy as np

from . import validation
from .errors import PerforateError
from .finetune import DEFAULTS as FINETUNE_DEFAULTS
from .tuning import DEFAULT_LADDER, STEP_RECOVERIES, TIES

log = logging.getLogger("onnx_perforate.cli")

EPILOG = "Exit status: 0 on success, 1 on an error (printed on stderr), 2 on bad usage. See docs/cli.md."


# ----------------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args) -> int:
    from .inspection import format_table, inspect

    records = inspect(args.model)
    print(format_table(records))
    if args.json:
        from .graph import write_json

        write_json([r.to_dict() for r in records], args.json)
    return 0


# ----------------------------------------------------------------------------------------------------
# perforate


def _parse_kernel(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxK (e.g. 3x3), got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected KxK with positive sizes (e.g. 3x3), got {text!r}")
    return parts[0], parts[1]


def select_layers(records, patterns=None, kernel=None) -> list:
    """Perforable Conv records whose name matches one of ``patterns`` (globs; default: all) and, if
    given, whose kernel is ``kernel``. A pattern that matches nothing is an error."""
    from .errors import UnknownNodeError, UnsupportedNodeError

    if not records:
        raise UnsupportedNodeError("the model has no convolution (Conv or QLinearConv node): nothing to perforate")
    chosen = []
    for pattern in patterns or ["*"]:
        hits = [r for r in records if fnmatch.fnmatchcase(r.name, pattern)]
        if not hits:
            names = ", ".join(r.name for r in records[:20])
            raise UnknownNodeError(f"--layers {pattern!r} matches no convolution; convolutions: {names}")
        for record in hits:
            if not record.perforable:
                if pattern == record.name:
                    raise PerforateError(f"Conv {record.name!r} cannot be perforated: {record.reason}")
                continue
            if kernel and tuple(record.kernel) != tuple(kernel):
                continue
            if record not in chosen:
                chosen.append(record)
    if not chosen:
        why = []
        if kernel:
            kernels = sorted({"x".join(map(str, r.kernel)) for r in records if r.perforable})
            why.append(f"none has --kernel {kernel[0]}x{kernel[1]} (perforable kernels: {', '.join(kernels) or 'none'})")
        why += [r.reason for r in records if not r.perforable]
        raise UnsupportedNodeError("no convolution is selected: " + "; ".join(why))
    return chosen


def cmd_perforate(args) -> int:
    from . import masks
    from .graph import load_model, save_model
    from .inspection import inspect
    from .rewrite import rewrite_with_report

    model = load_model(args.model)
    layers = select_layers(inspect(model), args.layers, args.kernel)
    chosen = {}
    for record in layers:
        shape = record.output_shape[2:]
        chosen[record.name] = masks.make(args.mask, shape, args.rate, seed=args.seed, model=model, conv=record.name)
    passes = dict(fuse=not args.no_fuse, compact=args.compact, skip_unprofitable=args.skip_unprofitable)
    for flag in ("fold_batchnorm", "fuse_activation", "interpolate_late"):
        if getattr(args, f"no_{flag}"):
            passes[flag] = False
    result, report = rewrite_with_report(model, chosen, portable=args.portable or False, **passes)
    for line in report.format().splitlines():
        log.info("%s", line)
    summary = {
        "model": str(args.model),
        "output": str(args.output),
        "mask": args.mask,
        "rate": args.rate,
        "seed": args.seed,
        "passes": {k: v for k, v in passes.items()},
        "portable": args.portable,
        **report.to_dict(),
    }
    summary_path = _outputs(args)["--summary"]
    save_model(result, args.output, external_data=True if args.external_data else None,
               json_files={summary_path: summary})
    print(f"wrote {args.output} ({len(layers)} Conv perforated, conv MACs {report.mac_reduction:.2f}x fewer) "
          f"and {summary_path}")
    return 0


# ----------------------------------------------------------------------------------------------------
# bench


def cmd_bench(args) -> int:
    from ._library import has_library
    from .graph import load_model
    from .runtime import model_input, peak_memory, session, time_interleaved, timing_input

    if not has_library():
        raise PerforateError("bench needs the compiled custom-op library (install the package or set ONNX_PERFORATE_LIBRARY)")
    paths = [args.model] + ([args.perforated] if args.perforated else [])
    models = [load_model(p) for p in paths]
    name, x = timing_input(models[0], args.batch)
    if len(models) == 2:
        dims = model_input(models[0]).dims
        other_name, other_dims = model_input(models[1])
        if other_name != name or not _shapes_agree(dims, other_dims):
            from .graph import format_shape

            raise PerforateError(f"the models take different inputs: {paths[0]} takes {name!r} "
                                 f"{format_shape(dims)}, {paths[1]} takes {other_name!r} "
                                 f"{format_shape(other_dims)}; bench compares a model with its perforated version")
    sessions = [session(m, args.threads) for m in models]
    times = time_interleaved(sessions, {name: x}, args.repeats, warmup=args.warmup, runs_per_turn=args.runs_per_turn,
                             progress=lambda rounds: _progress(rounds, "bench", args)).wall
    result = {"threads": args.threads, "batch": int(x.shape[0]), "repeats": args.repeats,
              "runs_per_turn": args.runs_per_turn, "models": []}
    peaks = [peak_memory(p, int(x.shape[0])) if args.memory else None for p in paths]
    for path, bucket, peak in zip(paths, times, peaks):
        median = statistics.median(bucket)
        entry = {"path": str(path), "median_ms": median * 1e3, "min_ms": min(bucket) * 1e3}
        memory = ""
        if peak is not None:
            entry["peak_run_memory_mib"] = peak["run_peak_bytes"] / 2**20
            memory = f", peak run memory {entry['peak_run_memory_mib']:.2f} MiB"
        result["models"].append(entry)
        print(f"{path}: median {median * 1e3:.3f} ms, min {min(bucket) * 1e3:.3f} ms ({args.repeats} runs){memory}")
    if len(sessions) == 2:
        result["speedup"] = statistics.median(times[0]) / statistics.median(times[1])
        print(f"speedup: {result['speedup']:.3f}x")
    if args.json:
        from .graph import write_json

        write_json(result, args.json)
    return 0


# ----------------------------------------------------------------------------------------------------
# eval


def _spec(args, input_dims):
    from .data import PRESETS, PreprocessSpec

    base = PRESETS[args.preset] if args.preset else PreprocessSpec()
    layout = args.layout
    if layout == "auto":
        layout = "NHWC" if len(input_dims) == 4 and input_dims[3] in (1, 3) and input_dims[1] not in (1, 3) else "NCHW"
    channels = input_dims[1] if layout == "NCHW" else input_dims[3]
    values = dict(base.__dict__)
    values.update(layout=layout, channels=channels if channels in (1, 3) else 3)
    if values["channels"] == 1:  # a preset's per-channel values, for a grayscale model
        values["mean"], values["std"] = values["mean"][:1], values["std"][:1]
    for key in ("size", "crop", "mean", "std", "scale"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.bgr:
        values["bgr"] = True
    return PreprocessSpec(**values)


def _topk_hits(scores, labels, k):
    top = np.argsort(-scores, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def _load_dataset(args, model):
    """The --data of eval, tune and finetune: an image folder with the preprocessing options, or arrays."""
    from .data import load_data
    from .errors import DataError
    from .runtime import model_input

    name, dims = model_input(model)
    if Path(args.data).is_dir():
        spec = _spec(args, dims)
    else:
        spec = None
        given = [option for option, value in (("--labels", args.labels), ("--preset", args.preset), ("--size", args.size),
                                              ("--crop", args.crop), ("--mean", args.mean), ("--std", args.std),
                                              ("--scale", args.scale), ("--bgr", args.bgr),
                                              ("--layout", args.layout != "auto")) if value]
        if given:
            raise DataError(f"{' '.join(given)} apply to an image folder; --data {args.data} is not a folder (arrays "
                            "are used as stored, labels come from the archive)")
    dataset = load_data(args.data, spec=spec, labels=args.labels, input_name=name, input_shape=dims, limit=args.limit)
    log.info("data: %s", dataset.description)
    return dataset


def _shapes_agree(a, b) -> bool:
    """Whether two input shapes (None: dynamic) can take the same tensors."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def cmd_eval(args) -> int:
    from .data import check_labels
    from .fallback import session
    from .graph import format_shape
    from .graph import load_model
    from .runtime import class_scores, model_input

    model = load_model(args.model)
    name, dims = model_input(model)
    dataset = _load_dataset(args, model)
    batch = dims[0] if dims and dims[0] else args.batch  # a static batch size wins
    sessions = [session(model, args.threads)]
    feed_names = [name]
    if args.compare:
        other = load_model(args.compare)
        other_name, other_dims = model_input(other)
        if not _shapes_agree(dims, other_dims):
            raise PerforateError(f"--compare {args.compare}: its input {other_name!r} has shape "
                                 f"{format_shape(other_dims)}, but {args.model}'s input {name!r} has shape "
                                 f"{format_shape(dims)}; both models must take the same inputs")
        sessions.append(session(other, args.threads))
        feed_names.append(other_name)
    paths = [args.model] + ([args.compare] if args.compare else [])
    predictions = [[] for _ in sessions]
    hits1 = [[] for _ in sessions]
    hits5 = [[] for _ in sessions]
    pending = _progress(dataset.batches(batch), "eval", args, total=-(-len(dataset) // batch))
    for x, labels in pending:
        count = len(x)  # the real rows: a static-batch model gets the last batch padded
        if dims[0] and count < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - count, axis=0)])
        for i, (sess, feed_name) in enumerate(zip(sessions, feed_names)):
            scores = class_scores(sess.run(None, {feed_name: x})[0], f"the output of {paths[i]}")[:count]
            predictions[i].append(scores.argmax(axis=1))
            if labels is not None:
                check_labels(labels, f"the labels of {args.data}", classes=scores.shape[1])
                hits1[i].append(_topk_hits(scores, labels, 1))
                hits5[i].append(_topk_hits(scores, labels, min(5, scores.shape[1])))
    result = {"model": str(args.model), "data": str(args.data), "count": len(dataset)}
    for i, path in enumerate(paths):
        key = "model" if i == 0 else "compare"
        if dataset.labels is not None:
            top1, top5 = float(np.concatenate(hits1[i]).mean()), float(np.concatenate(hits5[i]).mean())
            result[f"{key}_top1"], result[f"{key}_top5"] = top1, top5
            print(f"{path}: top-1 {top1:.4f}, top-5 {top5:.4f} on {len(dataset)} inputs")
    if args.compare:
        agreement = float((np.concatenate(predictions[0]) == np.concatenate(predictions[1])).mean())
        result["compare"] = str(args.compare)
        result["top1_agreement"] = agreement
        print(f"top-1 agreement with {args.compare}: {agreement:.4f}")
    if dataset.labels is None and not args.compare:
        log.warning("no labels and no --compare model: nothing to report beyond running the model")
    if args.json:
        from .graph import write_json

        write_json(result, args.json)
    return 0


def cmd_tune(args) -> int:
    from .graph import load_model
    from .tuning import tune

    if args.target_speedup is None and args.max_accuracy_drop is None:
        raise PerforateError("give --target-speedup and/or --max-accuracy-drop (where the search stops)")
    model = load_model(args.model)
    dataset = _load_dataset(args, model)
    result = tune(
        model, dataset, target_speedup=args.target_speedup, max_accuracy_drop=args.max_accuracy_drop,
        ladder=args.ladder, layers=args.layers, mask_kind=args.mask_kind, subset_size=args.subset_size,
        threads=args.threads, repeats=args.repeats, timing_batch=args.batch, include_1x1=args.include_1x1,
        tie=args.tie, step_recovery=args.step_recovery, evaluation_threads=args.evaluation_threads,
        checkpoint=args.checkpoint, progress=not args.no_progress,
        finetune=_finetune_options(args.finetune),
    )
    paths = result.save(args.output)
    print(result.table())
    print()
    if result.baselines:
        print(result.baseline_table())
        print()
    print(result.summary())
    print(f"model, report and plots in {args.output}")
    for kind, path in paths.items():
        log.info("%s: %s", kind, path)
    return 0


def _finetune_options(text):
    """--finetune: off (None), on with the defaults (""), or KEY=VALUE,... options of finetune()."""
    import inspect

    from .finetune import finetune

    if text is None:
        return False
    # checked before the search, which may take long, rather than when the options are used
    known = sorted(name for name, p in inspect.signature(finetune).parameters.items()
                   if p.kind is p.KEYWORD_ONLY and name not in ("threads", "progress", "start"))
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise PerforateError(f"--finetune options are KEY=VALUE separated by commas, got {item!r}")
        if key not in known:
            raise PerforateError(f"--finetune: unknown option {key!r}; options: {', '.join(known)}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value.strip()
    return options or True


def cmd_finetune(args) -> int:
    from .finetune import finetune
    from .graph import load_model, save_model, write_json

    original = load_model(args.original)
    dataset = _load_dataset(args, original)
    result = finetune(
        args.perforated, original, dataset, method=args.method, parameters=args.parameters, epochs=args.epochs,
        batch_size=args.batch, learning_rate=args.lr, label_weight=args.label_weight, holdout=args.holdout,
        patience=args.patience, augment=args.augment, seed=args.seed, threads=args.threads,
        checkpoint=args.checkpoint, progress=not args.no_progress, time_budget_s=args.time_budget,
        lr_backoff=args.lr_backoff, weight_decay=args.weight_decay, temperature=args.temperature,
    )
    save_model(result.model, args.output)
    report = _outputs(args)["--report"]
    write_json(result.to_dict(), report)
    print(result.summary())
    print(f"model in {args.output}, history in {report}")
    return 0


# ----------------------------------------------------------------------------------------------------
# Parser and entry point


def _progress(iterable, desc, args, total=None):
    from .progress import progress

    return iterable if args.no_progress else progress(iterable, desc=desc, total=total)


def _floats(text):
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _option(check, **bounds):
    """An argparse type from a check of onnx_perforate.validation: the same range, the same message."""
    from .errors import SettingError

    def parse(text):
        value = text
        for number in (lambda t: int(t, 10), float):  # an integer stays one; the check refuses what does not fit
            try:
                value = number(text)
                break
            except (TypeError, ValueError):  # TypeError: a number already (a list item of _floats_option)
                pass
        try:
            return check(value, "the value", **bounds)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("the value ", "", 1)) from None

    return parse


def _floats_option(check, **bounds):
    def parse(text):
        values = _floats(text)
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
        return tuple(_option(check, **bounds)(v) for v in values)

    return parse


_rate = _option(validation.rate)
_positive_int = _option(validation.integer, minimum=1)
_threads = _option(validation.threads)
_nonnegative_int = _option(validation.integer, minimum=0)
_positive_float = _option(validation.real, minimum=0.0, exclusive_minimum=True)


def _add_data_arguments(p) -> None:
    p.add_argument("--data", required=True,
                   help="image folder, or .npz (keys: the input name, images or x; labels or y) or .npy")
    p.add_argument("--labels", help="labels file for an image folder: lines `FILE CLASS_INDEX` "
                   "(default: DATA/labels.txt, else class subfolders)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N inputs")
    g = p.add_argument_group("image preprocessing (image folders only)")
    g.add_argument("--preset", choices=["caffe", "torchvision", "raw"],
                   help="caffe: 256/224, BGR, mean 104,117,123; torchvision: 256/224, /255, ImageNet mean/std")
    g.add_argument("--size", type=_positive_int, help="resize the shorter side to this")
    g.add_argument("--crop", type=_positive_int, help="centre crop to this square size")
    g.add_argument("--mean", type=_floats_option(validation.real), help="per-channel mean, in the model's channel order, after --scale")
    g.add_argument("--std", type=_floats_option(validation.real, minimum=0.0, exclusive_minimum=True), help="per-channel std, in the model's channel order")
    g.add_argument("--scale", type=_positive_float, help="multiply pixel values (0..255) by this first, e.g. 0.00392157")
    g.add_argument("--bgr", action="store_true", help="feed channels in BGR order")
    g.add_argument("--layout", choices=["auto", "NCHW", "NHWC"], default="auto",
                   help="input layout (default: from the model's input shape)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity on stderr (default: INFO); DEBUG also shows ONNX Runtime's warnings")
    common.add_argument("--no-progress", action="store_true", help="do not show progress bars")

    parser = argparse.ArgumentParser(
        prog="onnx-perforate",
        description="Perforated convolutions for ONNX models: skip computing some Conv output positions and "
        "fill them by nearest-neighbour interpolation, run by ONNX Runtime custom ops.",
        epilog=EPILOG,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", parents=[common], epilog=EPILOG,
                       help="list the Conv nodes with shapes and MACs",
                       description="Print a table of the model's convolutions: input/weight/output shapes, "
                       "kernel, stride, group, MACs per image and their share. The names are the keys "
                       "that --layers and rewrite() use.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("perforate", parents=[common], epilog=EPILOG,
                       help="write a perforated model and a JSON summary",
                       description="Replace the selected Conv nodes by PerforatedConv + NNInterpolate with "
                       "masks of the given kind and rate, and write the model and a JSON summary "
                       "(layers, masks, theoretical MAC reduction).")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", required=True, help="where to write the perforated model")
    p.add_argument("--mask", choices=["uniform", "grid", "pooling"], default="grid",
                   help="mask kind (default: grid); pooling falls back to uniform where no pooling follows")
    p.add_argument("--rate", type=_rate, required=True, help="fraction of output positions skipped, in [0, 1)")
    p.add_argument("--layers", nargs="+", metavar="NAME",
                   help="Conv names or glob patterns (default: every perforable Conv); see `inspect`")
    p.add_argument("--kernel", type=_parse_kernel, metavar="KxK",
                   help="only Conv nodes with this kernel size, e.g. 3x3")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of uniform masks and pooling ties (default: 0)")
    p.add_argument("--summary", metavar="FILE", help="JSON summary path (default: OUTPUT with .json)")
    p.add_argument("--no-fuse", action="store_true", help="turn off all graph passes")
    p.add_argument("--no-fold-batchnorm", action="store_true", help="do not fold a following BatchNormalization")
    p.add_argument("--no-fuse-activation", action="store_true", help="do not fuse a following Relu/LeakyRelu/Clip")
    p.add_argument("--no-interpolate-late", action="store_true",
                   help="do not move position-wise ops before the interpolation")
    p.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                   help="keep perforated tensors compact through 1x1 convolutions, concatenations, residual adds "
                   "and global pooling, and let perforated convolutions read compact inputs (default: on; "
                   "--no-compact gives the explicit form, one NNInterpolate per perforated Conv; both run on CPU, CUDA "
                   "and the Python fallback)")
    p.add_argument("--skip-unprofitable", action="store_true",
                   help="keep a requested layer as plain Conv where the CPU cost model predicts perforating it cannot "
                   "pay (its kernel efficiency, interpolation and layout reorders; docs/rewriter.md); the report says "
                   "which and why")
    p.add_argument("--portable", nargs="?", const="functions", choices=["functions", "expanded"],
                   help="also give each custom op a standard-ONNX function body, so that the model runs (slowly) "
                   "without the library; 'expanded' inlines the bodies: no custom op is left (docs/deployment.md)")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in OUTPUT.data (automatic above 2 GB)")
    p.set_defaults(func=cmd_perforate)

    p = sub.add_parser("bench", parents=[common], epilog=EPILOG,
                       help="ORT latency of a model and its perforated version",
                       description="Time the models in ONNX Runtime with the custom-op library, the same "
                       "thread count and spinning off for both, runs interleaved after a warm-up; prints the "
                       "median latency and the speed-up.")
    p.add_argument("model", help="the original ONNX model")
    p.add_argument("perforated", nargs="?", help="the perforated model (optional)")
    p.add_argument("--threads", type=_threads, default=1, help="intra-op threads for both models (default: 1)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size for dynamic-batch inputs (default: 1)")
    p.add_argument("--repeats", type=_positive_int, default=50, help="timed runs per model (default: 50)")
    p.add_argument("--warmup", type=_nonnegative_int, default=5, help="untimed runs per model first (default: 5)")
    p.add_argument("--runs-per-turn", type=_positive_int, default=1,
                   help="1 (default): the models alternate run by run, so each run starts with the other "
                   "model's data in the caches; N > 1: N runs per turn, the first untimed, timing each "
                   "model in the steady state of a model run repeatedly")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure each model's peak memory while running, in a subprocess (default: on)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", parents=[common], epilog=EPILOG,
                       help="top-1/top-5 accuracy, and agreement with another model",
                       description="Run the model on a folder of images (with a preprocessing spec) or on "
                       ".npz/.npy arrays, and report top-1/top-5 accuracy when labels are known and top-1 "
                       "agreement with --compare. Perforated models run with the custom-op library, or "
                       "slowly through Python ops when it is missing.")
    p.add_argument("model", help="ONNX model file")
    _add_data_arguments(p)
    p.add_argument("--compare", metavar="MODEL", help="another model (e.g. the original) to measure agreement with")
    p.add_argument("--batch", type=_positive_int, default=32, help="batch size for dynamic-batch inputs (default: 32)")
    p.add_argument("--threads", type=_threads, help="intra-op threads")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", parents=[common], epilog=EPILOG,
                       help="greedy multi-layer perforation to a target speedup or accuracy budget",
                       description="Climb each layer's ladder of perforation rates, one layer a step: the layer "
                       "whose next rung costs the least loss per time saved, (L - L0) / (t0 - t), with t the "
                       "whole network's time measured in ORT. Masks are impact masks from gradients computed "
                       "in ORT (for a QDQ model, on its float twin; the candidates stay INT8 and are timed as "
                       "such). Writes OUTPUT/model.onnx, report.json, tradeoff.png and masks.png.")
    p.add_argument("model", help="ONNX model file")
    _add_data_arguments(p)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--target-speedup", type=_option(validation.real, minimum=1.0, exclusive_minimum=True), help="stop once the network is this much faster in ORT")
    p.add_argument("--max-accuracy-drop", type=_option(validation.real, minimum=0.0, maximum=1.0),
                   help="stop before calibration top-1 (agreement with the original without labels) drops more "
                   "than this (default: 0.10; 1 for no budget)")
    p.add_argument("--subset-size", type=_positive_int, default=256,
                   help="calibration images, evenly spaced; the rest are held out for the final evaluation "
                   "(default: 256)")
    p.add_argument("--ladder", type=_floats_option(validation.rate), default=DEFAULT_LADDER,
                   help=f"rates each layer climbs through (default: {','.join(f'{r:g}' for r in DEFAULT_LADDER)})")
    p.add_argument("--mask-kind", choices=["impact", "uniform", "grid"], default="impact")
    p.add_argument("--layers", nargs="+", help="tune only these Conv nodes (default: every spatial Conv)")
    p.add_argument("--include-1x1", action="store_true", help="also perforate 1x1 convolutions")
    p.add_argument("--tie", choices=TIES, default="none",
                   help="regions: Convs that can run compact end to end (e.g. a SqueezeNet Fire module, "
                   "1x1 convs included) share one mask and climb one ladder; auto: every step may move a Conv "
                   "alone or such a region, whichever costs less loss per time saved (default: none)")
    p.add_argument("--threads", type=_threads, help="intra-op threads for timing")
    p.add_argument("--evaluation-threads", type=_threads,
                   help="intra-op threads for what is not timed: the candidates' accuracy, impact gradients, "
                   "recovery, held-out evaluation (default: ONNX Runtime's, every core)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size latency is measured at (default: 1)")
    p.add_argument("--repeats", type=_positive_int, default=15, help="timed runs per candidate (median)")
    p.add_argument("--checkpoint", help="JSON file written after every step; resumes from it if it exists")
    p.add_argument("--finetune", nargs="?", const="", metavar="KEY=VALUE,...",
                   help="recover the final model's accuracy on the calibration images (see `finetune`); "
                   "optional options, e.g. method=bn_reestimation,epochs=6")
    p.add_argument("--step-recovery", choices=STEP_RECOVERIES, default="none",
                   help="apply this training-free recovery after every step, so that the next step's candidates "
                   "are judged on the recovered network (default: none)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("finetune", parents=[common], epilog=EPILOG,
                       help="recover the accuracy a perforated model lost (distillation, bias correction, BN)",
                       description="Train the perforated model to reproduce the original model's outputs on the "
                       "data (labels mixed in when given), with gradients from an onnx-ad derivative graph run in "
                       "ONNX Runtime, or apply a training-free correction. Every fifth image (interleaved) is held "
                       "out for early stopping; the result is never worse on it than the input.")
    p.add_argument("perforated", help="the perforated model (from perforate or tune)")
    p.add_argument("--original", required=True, help="the model it was made from")
    _add_data_arguments(p)
    p.add_argument("-o", "--output", required=True, help="where to write the recovered model")
    p.add_argument("--report", help="JSON history (default: OUTPUT with .json)")
    p.add_argument("--method", default="auto",
                   help="distill, bias_correction, bn_reestimation, or several joined by + (applied in turn, "
                   "e.g. bn_reestimation+distill); default auto: bn_reestimation+distill with BatchNorm, else distill")
    p.add_argument("--parameters", choices=["all", "perforated", "biases"], default="all",
                   help="what trains (distill): every layer, the perforated layers and their consumers, or "
                   "biases and BatchNorm only (default: all)")
    defaults = FINETUNE_DEFAULTS
    p.add_argument("--epochs", type=_positive_int, default=defaults["epochs"],
                   help=f"most epochs (default: {defaults['epochs']}; early stopping may end sooner)")
    p.add_argument("--batch", type=_positive_int, default=defaults["batch_size"],
                   help=f"training batch size (default: {defaults['batch_size']})")
    p.add_argument("--lr", type=_positive_float, default=defaults["learning_rate"],
                   help=f"peak Adam learning rate, cosine decay (default: {defaults['learning_rate']:g})")
    p.add_argument("--no-lr-backoff", dest="lr_backoff", action="store_false",
                   help="keep the learning rate (by default, when the first epoch more than doubles the held-out "
                   "loss or no epoch improves on the input before early stopping, training restarts at a tenth of "
                   "it, at most twice)")
    p.add_argument("--label-weight", type=_option(validation.real, minimum=0.0, maximum=1.0),
                   default=defaults["label_weight"],
                   help=f"share of the labels in the target distribution (default: {defaults['label_weight']:g})")
    p.add_argument("--holdout", type=_option(validation.real, minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True), default=defaults["holdout"], help=f"fraction of images held out (default: {defaults['holdout']:g})")
    p.add_argument("--patience", type=_positive_int, default=defaults["patience"],
                   help=f"epochs without held-out improvement before stopping (default: {defaults['patience']})")
    p.add_argument("--augment", default=defaults["augment"],
                   help="image augmentation: auto, none, or parts of flip, crop, cutout, mixup, cutmix joined by + "
                   "(mixup/cutmix blend two images, which the original labels; default auto: flips and crops for "
                   "4-D image inputs)")
    p.add_argument("--weight-decay", type=_option(validation.real, minimum=0.0, maximum=1.0, exclusive_maximum=True),
                   default=defaults["weight_decay"],
                   help=f"decoupled (AdamW) weight decay of the weight kernels (default: {defaults['weight_decay']:g})")
    p.add_argument("--temperature", type=_positive_float, default=defaults["temperature"],
                   help="distillation temperature: both distributions softened by it, 1 the plain KL "
                   f"(default: {defaults['temperature']:g})")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--threads", type=_threads, help="intra-op threads")
    p.add_argument("--time-budget", type=_positive_float, metavar="SECONDS", help="stop after the epoch that passes this")
    p.add_argument("--checkpoint", help=".npz written after every epoch; resumes from it if it exists")
    p.set_defaults(func=cmd_finetune)
    return parser


# What each command reads and writes, checked before any work (graph.check_outputs): an output must not
# be one of the inputs, which writing it would destroy.
_INPUTS = {"model": "the input model", "perforated": "the perforated model", "original": "the original model",
           "compare": "the --compare model", "data": "the --data file", "labels": "the --labels file"}


def _outputs(args) -> dict:
    """{option: path} of every file the command will write (None where an optional one is not given)."""
    if args.command == "perforate":
        return {"--output": args.output, "--summary": args.summary or Path(args.output).with_suffix(".json"),
                "the external data": f"{args.output}.data" if args.external_data else None}
    if args.command == "tune":
        from .tuning import TuneResult

        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise PerforateError(f"-o {args.output!r} is a file; tune writes into a folder (created if needed)")
        paths = {f"{path.name} in -o": path for path in TuneResult.output_paths(args.output).values()}
        return {**paths, "--checkpoint": args.checkpoint}
    if args.command == "finetune":
        return {"--output": args.output, "--report": args.report or Path(args.output).with_suffix(".json"),
                "--checkpoint": args.checkpoint}
    return {"--json": args.json}


def check_paths(args) -> None:
    from .graph import check_outputs

    inputs = {label: getattr(args, name) for name, label in _INPUTS.items() if getattr(args, name, None)}
    check_outputs(_outputs(args), inputs)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s: %(message)s", stream=sys.stderr)
    from ._library import hide_ort_errors, show_ort_warnings

    if args.log_level == "DEBUG":
        show_ort_warnings()
    else:
        hide_ort_errors()  # each one is the exception reported below
    try:
        check_paths(args)
        return args.func(args)
    except KeyboardInterrupt:  # outputs are written whole or not at all (graph.atomic_outputs)
        print(f"onnx-perforate {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line on stderr; --log-level DEBUG adds the traceback
        log.debug("traceback:", exc_info=True)
        print(f"onnx-perforate {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 1
    finally:
        hide_ort_errors(False)  # for a caller that goes on in this process (the Python API logs ORT's errors)


def error_message(exc: BaseException) -> str:
    """One line saying what went wrong: the package's errors and OS errors speak for themselves, anything
    else is named by its type (it is a bug or an unforeseen input: the traceback is under DEBUG)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (PerforateError, OSError)):
        return text
    if type(exc).__module__.startswith("onnxruntime"):  # e.g. a custom op refusing an input: it names the node
        if "Status Message: " in text:  # a kernel's own message, after ORT's preamble
            return f"ONNX Runtime: {text.split('Status Message: ', 1)[1]}"
        return f"ONNX Runtime: {text.split(' : ', 3)[-1] if text.startswith('[ONNXRuntimeError]') else text}"
    return f"unexpected {type(exc).__name__}: {text} (run with --log-level DEBUG for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
