"""End-to-end comparison of a model and its perforations (same masks): the compact rewrite (default),
optionally the explicit one and the compact one with ORT's NCHWc transformer off.

    ONNX_PERFORATE_LIBRARY=... python3 benchmarks/bench_models.py ../shared/data/imagenet/squeezenet1.1.onnx \
        --mask grid --rate 0.5 --layers all --threads 1 2 --batch 1 32 --accuracy

Prints Markdown tables:

- latency: median ms over interleaved runs (all variants take turns, so load drifts hit them alike) for
  every thread count and batch size; speed-up against the original; the Conv-MAC reduction R of the
  rewrite and the *achieved fraction* speed-up / R (1 = the clock tracks the MACs), and the share of
  the time the MACs save that shows up on the clock, (speed-up - 1) / (R - 1). With one thread the
  median per-run CPU time of the process is printed too ("cpu"): on a shared machine it is far less
  disturbed by other jobs than wall time;
- memory, two ways (docs/compact.md):
  *measured*: a fresh subprocess per model loads the session (CPU arena off, memory pattern on, so ORT
  allocates exactly what it plans instead of arena chunks), runs once (weights are packed and gather
  tables built on the first run: constant memory, not activations), resets the kernel's peak-RSS
  counter (/proc/self/clear_refs), runs three more times and reports peak RSS minus RSS before them;
  *planned*: the peak of live activation bytes when the nodes run in graph order and every tensor is
  freed after its last reader (Reshape/Flatten/Squeeze/Unsqueeze/Identity outputs alias their input, and
  so does a Relu/LeakyRelu/Clip that ORT fuses into the Conv before it),
  and the bytes of all activations written (the paper's "activations to store");
- accuracy (``--accuracy``): top-1/top-5 on SqueezeNet's val100, top-1 on every 10th CIFAR-10 test image,
  top-1 on the bundled Fashion-MNIST subset, chosen from the model's file name;
- ``--profile``: per-node time (ORT profiling, summed ``dur`` per node over the runs) of each variant.

Models with a fixed batch of 1 (SqueezeNet) get a symbolic batch dimension first, so batch 8 can run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnx_perforate
from onnx_perforate import masks as masks_module
from onnx_perforate import runtime
from onnx_perforate.inspection import inspect

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("original", "explicit", "compact", "compact-nonchwc", "compact-profitable")
# ORT's NCHWc layout transformer: it blocks the channels of the Convs it knows and inserts reorders
# around every other op (ours included); "compact-nonchwc" runs the compact rewrite without it.
# "compact-profitable": the compact rewrite that keeps layers as plain Conv where the cost model predicts
# perforating them cannot pay (RewriteOptions.skip_unprofitable).
NCHWC_TRANSFORMER = "NchwcTransformer"
ALIASING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")
FUSED_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip")


# ----------------------------------------------------------------------------------------------------
# Models


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a symbolic batch dimension 'N' on its inputs and outputs (value_info dropped so
    that shape inference recomputes it). Only for graphs whose ops do not bake in the batch size."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    del model.graph.value_info[:]
    return model


def select(model, spec: str) -> list:
    """Conv records for ``spec``: all | all-but-first | all-3x3 | all-1x1 | comma-separated globs."""
    records = [r for r in inspect(model) if r.perforable]
    if spec == "all":
        return records
    if spec == "all-but-first":
        return records[1:]
    if spec in ("all-3x3", "all-1x1"):
        k = 3 if spec == "all-3x3" else 1
        return [r for r in records if tuple(r.kernel) == (k, k)]
    patterns = spec.split(",")
    return [r for r in records if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


def choose_masks(original: onnx.ModelProto, mask_kind: str, rate: float, layers: str, seed: int = 0) -> dict:
    """{Conv name: mask} of ``mask_kind`` at ``rate`` for the Convs ``layers`` selects (see select)."""
    return {
        r.name: masks_module.make(mask_kind, r.output_shape[2:], rate, seed=seed, model=original, conv=r.name)
        for r in select(original, layers)
    }


def build_variants(path, mask_kind, rate, layers, seed=0, variants=("original", "explicit", "compact")):
    """{variant: ModelProto}, the chosen masks and {variant: its rewrite's report}."""
    original = dynamic_batch(onnx.load(str(path)))
    chosen = choose_masks(original, mask_kind, rate, layers, seed)
    compact, report = onnx_perforate.rewrite_with_report(original, chosen, compact=True)
    models = {"original": original, "compact": compact, "compact-nonchwc": compact}
    reports = {"compact": report, "compact-nonchwc": report}
    if "explicit" in variants:
        models["explicit"], reports["explicit"] = onnx_perforate.rewrite_with_report(original, chosen, compact=False)
    if "compact-profitable" in variants:
        models["compact-profitable"], reports["compact-profitable"] = onnx_perforate.rewrite_with_report(
            original, chosen, skip_unprofitable=True)
    keep = [k for k in VARIANTS if k in variants or k == "original"]
    return {k: models[k] for k in keep}, chosen, {k: reports[k] for k in keep if k in reports}


def session(model_or_path, threads, disabled_optimizers=(), **settings):
    return runtime.session(model_or_path, threads, quiet=True, disabled_optimizers=disabled_optimizers, **settings)


def disabled_for(key: str) -> list:
    """The ORT transformers a variant runs without."""
    return [NCHWC_TRANSFORMER] if key.endswith("-nonchwc") else []


def variant_session(key, model_or_path, threads, **settings):
    return session(model_or_path, threads, disabled_for(key), **settings)


# ----------------------------------------------------------------------------------------------------
# Latency


def latency(models: dict, threads: int, batch: int, repeats: int, warmup: int = 3, stat=statistics.median,
            runs_per_turn: int = 1) -> tuple[dict, dict]:
    """({variant: wall ms}, {variant: process CPU ms}), ``stat`` (median) of interleaved runs
    (``runs_per_turn``: see runtime.time_interleaved)."""
    sessions = {k: variant_session(k, m, threads) for k, m in models.items()}
    name, x = runtime.timing_input(models["original"], batch)
    timings = runtime.time_interleaved(list(sessions.values()), {name: x}, repeats, warmup=warmup,
                                       runs_per_turn=runs_per_turn)
    return ({k: stat(v) * 1e3 for k, v in zip(sessions, timings.wall)},
            {k: stat(v) * 1e3 for k, v in zip(sessions, timings.cpu)})


STATISTICS = {"median": statistics.median, "min": min, "p10": lambda v: float(np.percentile(v, 10))}


def fractions(speedup: float, reduction: float) -> str:
    """'achieved fraction | share of the saved time' cells (no share where the rewrite removed no MACs)."""
    share = f"{(speedup - 1) / (reduction - 1):.2f}" if reduction > 1.0001 else "-"
    return f"{speedup / reduction:.2f} | {share}"


# ----------------------------------------------------------------------------------------------------
# Memory


def planned_memory(model: onnx.ModelProto, batch: int) -> tuple[int, int]:
    """(peak live activation bytes in graph order, bytes of all activations written); see the module
    docstring."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    sizes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (batch if d.dim_param else None) for d in t.shape.dim]
        if None in dims:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
        sizes[vi.name] = int(np.prod(dims)) * itemsize
    graph = inferred.graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producer = {out: node.op_type for node in graph.node for out in node.output}
    root = {}
    for node in graph.node:
        aliasing = node.op_type in ALIASING
        # ORT fuses an activation into the Conv before it when the Conv output has no other reader:
        # the two share one buffer.
        fused = (node.op_type in FUSED_ACTIVATIONS and node.input and producer.get(node.input[0]) == "Conv"
                 and readers.get(node.input[0]) == 1)
        if (aliasing or fused) and node.input and node.input[0] in (root.keys() | sizes.keys()):
            root[node.output[0]] = root.get(node.input[0], node.input[0])
    last_use = {}
    for step, node in enumerate(graph.node):
        for name in node.input:
            last_use[root.get(name, name)] = step
    for out in graph.output:
        last_use[root.get(out.name, out.name)] = len(graph.node)
    live, peak = {}, 0
    for step, node in enumerate(graph.node):
        for name in node.output:
            if name and name not in root and name in sizes:
                live[name] = sizes[name]
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= step]:
            del live[name]
    total = sum(size for name, size in sizes.items() if name not in root)
    return peak, total


# ----------------------------------------------------------------------------------------------------
# Accuracy


def accuracy(models: dict, path: Path, threads: int = 2) -> dict | None:
    from onnx_perforate.data import PRESETS, Dataset, load_arrays, load_folder

    stem = path.name.lower()
    shared = ROOT.parent / "shared" / "data"
    if "squeezenet" in stem:
        data, batch, topk = load_folder(shared / "imagenet" / "val100", PRESETS["caffe"]), 10, (1, 5)
    elif "cifar" in stem:
        full = load_arrays(shared / "cifar10" / "cifar10_test.npz", input_shape=["N", 3, 32, 32])
        x_all = full.load(0, len(full))[::10]  # sorted by class: every 10th image is balanced
        data, batch, topk = Dataset(len(x_all), lambda a, b: x_all[a:b], full.labels[::10]), 100, (1,)
    elif "fashion" in stem:
        npz = ROOT / "sample_models" / "fashion_mnist_subset.npz"
        name, dims = runtime.model_input(models["original"])
        data, batch, topk = load_arrays(npz, input_name=name, input_shape=dims), 100, (1,)
    else:
        return None
    result = {}
    for key, model in models.items():
        sess = variant_session(key, model, threads)
        name = runtime.model_input(model).name
        hits = {k: [] for k in topk}
        for x, y in data.batches(batch):
            scores = sess.run(None, {name: x})[0].reshape(len(x), -1)
            order = np.argsort(-scores, axis=1)
            for k in topk:
                hits[k].append((order[:, :k] == y[:, None]).any(axis=1))
        result[key] = {f"top{k}": float(np.concatenate(v).mean()) for k, v in hits.items()}
    return result


# ----------------------------------------------------------------------------------------------------
# Per-node profile


def profile(models: dict, threads: int, batch: int, runs: int, workdir: Path, stat=statistics.median) -> dict:
    """{variant: {node name: (op type, ``stat`` of its ms over the runs)}} from ORT's profiler."""
    result = {}
    for key, model in models.items():
        sess = variant_session(key, model, threads, enable_profiling=True,
                               profile_file_prefix=str(workdir / f"profile_{key}"))
        name, x = runtime.timing_input(model, batch)
        warmup = 3
        for _ in range(warmup + runs):
            sess.run(None, {name: x})
        trace = json.loads(Path(sess.end_profiling()).read_text())
        # Leave out the warm-up runs (the first packs weights and builds tables): node events that
        # start before the first timed run.
        starts = sorted(e["ts"] for e in trace if e.get("name") == "model_run")
        timed_from = starts[warmup] if len(starts) > warmup else 0
        per_node = {}
        for event in trace:
            if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
                continue
            if event["ts"] < timed_from:
                continue
            node = event["name"][: -len("_kernel_time")]
            op = event.get("args", {}).get("op_name", "?")
            per_node.setdefault(node, (op, []))[1].append(event["dur"] / 1e3)
        result[key] = {n: (op, stat(times)) for n, (op, times) in per_node.items()}
    return result


def format_profile(prof: dict, top: int) -> str:
    names = sorted(set().union(*[set(p) for p in prof.values()]),
                   key=lambda n: -max(p.get(n, ("", 0.0))[1] for p in prof.values()))
    lines = ["| node | " + " | ".join(f"{k} op | {k} ms" for k in prof) + " |",
             "|---|" + "---|---|" * len(prof)]
    for n in names[:top]:
        cells = []
        for p in prof.values():
            op, t = p.get(n, ("", None))
            cells += [op, f"{t:.3f}" if t is not None else ""]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    totals = [f"{sum(t for _, t in p.values()):.3f}" for p in prof.values()]
    lines.append("| **sum of node times** | " + " | ".join(f" | {t}" for t in totals) + " |")
    by_op = {}
    for key, p in prof.items():
        for op, t in p.values():
            by_op.setdefault(op, {}).setdefault(key, 0.0)
            by_op[op][key] += t
    lines += ["", "| op type | " + " | ".join(f"{k} ms" for k in prof) + " |", "|---|" + "---|" * len(prof)]
    for op, per in sorted(by_op.items(), key=lambda kv: -max(kv[1].values())):
        lines.append(f"| {op} | " + " | ".join(f"{per.get(k, 0.0):.3f}" for k in prof) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--mask", default="grid", choices=["grid", "uniform", "pooling"])
    p.add_argument("--rate", type=float, nargs="+", default=[0.5])
    p.add_argument("--layers", default="all",
                   help="all | all-but-first | all-3x3 | all-1x1 | comma-separated globs (default: all)")
    p.add_argument("--variants", nargs="+", default=["compact"], choices=[v for v in VARIANTS if v != "original"],
                   help="perforated variants timed against the original (default: compact)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--runs-per-turn", type=int, default=1,
                   help="1: models alternate run by run, each run starting with the other model's data in the "
                        "caches; n > 1: n runs per turn, the first untimed (the steady state of a model run "
                        "repeatedly)")
    p.add_argument("--stat", choices=sorted(STATISTICS), default="median",
                   help="statistic of the interleaved runs and of the per-node profile (p10 or min: the least "
                        "disturbed runs, for a machine other jobs load)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-node time breakdown (1 thread, first batch size)")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--report", action="store_true", help="print the compact rewrite's report")
    p.add_argument("--save", type=Path, help="folder to keep the models in")
    args = p.parse_args(argv)
    if not onnx_perforate.has_library():
        print("needs the compiled custom-op library (ONNX_PERFORATE_LIBRARY)", file=sys.stderr)
        return 1

    print(f"# {args.model.name} end to end (onnxruntime {ort.__version__}, {runtime.cpu_description()})")
    for rate in args.rate:
        models, chosen, reports = build_variants(args.model, args.mask, rate, args.layers, variants=args.variants)
        perforated = [k for k in models if k != "original"]
        reduction = {k: r.mac_reduction for k, r in reports.items()}
        interps = {k: sum(n.op_type == "NNInterpolate" for n in m.graph.node) for k, m in models.items()}
        print(f"\n## {args.model.name}: {args.mask} r={rate}, {len(chosen)} Conv requested ({args.layers})\n")
        print("Conv-MAC reduction R: " + ", ".join(f"{k} {reduction[k]:.2f}x" for k in perforated)
              + "; NNInterpolate nodes: " + ", ".join(f"{k} {interps[k]}" for k in perforated) + "\n")
        for k in perforated:
            if reports[k].kept_plain:
                print(f"{k} keeps {len(reports[k].kept_plain)} as plain Conv: " + "; ".join(
                    f"{name} ({why.split(': ', 1)[-1]})" for name, why in reports[k].kept_plain.items()) + "\n")
        if args.report:
            for k in perforated:
                print(f"{k}:\n```\n" + reports[k].format() + "\n```\n")
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.save or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            paths = {}
            for k, m in models.items():
                paths[k] = folder / f"{args.model.stem}.r{rate}.{k}.onnx"
                onnx.save(m, paths[k])
            turns = "one run per turn" if args.runs_per_turn == 1 else f"{args.runs_per_turn} runs per turn, the first untimed"
            print(f"{args.stat} of {args.repeats} interleaved runs ({turns})\n")
            print("| threads | batch | original ms | " + " | ".join(f"{k} ms | {k} speed-up | fraction of R | share of saved time"
                                                          for k in perforated) + " | cpu speed-up (1 thread) |")
            print("|---|---|---|" + "---|---|---|---|" * len(perforated) + "---|")
            for threads in args.threads:
                for batch in args.batch:
                    wall, cpu = latency(models, threads, batch, args.repeats, stat=STATISTICS[args.stat],
                                        runs_per_turn=args.runs_per_turn)
                    cells = []
                    for k in perforated:
                        speedup = wall["original"] / wall[k]
                        cells.append(f"{wall[k]:.3f} | {speedup:.2f}x | {fractions(speedup, reduction[k])}")
                    cpu_cell = (", ".join(f"{k} {cpu['original'] / cpu[k]:.2f}x ({fractions(cpu['original'] / cpu[k], reduction[k]).split(' | ')[0]})"
                                          for k in perforated) if threads == 1 else "")
                    print(f"| {threads} | {batch} | {wall['original']:.3f} | " + " | ".join(cells) + f" | {cpu_cell} |", flush=True)
            if not args.no_memory:
                print("\n| batch | variant | measured peak run RSS MiB | planned peak activations MiB | all activations MiB |")
                print("|---|---|---|---|---|")
                for batch in args.batch:
                    for k in models:
                        measured = runtime.peak_memory(paths[k], batch, disabled_optimizers=disabled_for(k))
                        planned, total = planned_memory(models[k], batch)
                        if measured is None:
                            cell = "not measured (see the warning)"
                        else:
                            flag = "" if measured["resettable"] else " (peak not resettable: includes loading)"
                            cell = f"{measured['run_peak_bytes'] / 2**20:.2f}{flag}"
                        print(f"| {batch} | {k} | {cell} | {planned / 2**20:.2f} | {total / 2**20:.2f} |", flush=True)
            if args.accuracy:
                acc = accuracy({k: m for k, m in models.items() if k in ("original", "explicit", "compact")}, args.model)
                if acc:
                    keys = list(next(iter(acc.values())))
                    print("\n| variant | " + " | ".join(keys) + " |")
                    print("|---|" + "---|" * len(keys))
                    for k, v in acc.items():
                        print(f"| {k} | " + " | ".join(f"{v[key]:.3f}" for key in keys) + " |")
            if args.profile:
                print(f"\nper-node time, 1 thread, batch {args.batch[0]} ({args.stat} ms over {args.repeats} runs):\n")
                prof = profile(models, 1, args.batch[0], args.repeats, folder, STATISTICS[args.stat])
                print(format_profile(prof, args.profile_top))
                # Per-node statistics resist load from other jobs better than whole runs do (a node is
                # short, so some of its runs are undisturbed): the sums give a second speed-up estimate.
                sums = {k: sum(t for _, t in p.values()) for k, p in prof.items()}
                print("\nfrom the sums of per-node times: " + ", ".join(
                    f"{k} {sums['original'] / sums[k]:.2f}x (fraction of R {sums['original'] / sums[k] / reduction[k]:.2f})"
                    for k in perforated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
