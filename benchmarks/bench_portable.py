"""What each form of a perforated model costs (docs/deployment.md): the custom-op form, the portable
form (model-local functions) with and without our library, and the expanded form, against the original.

    flock /tmp/onnx_perforate_bench.lock python3 benchmarks/bench_portable.py \\
        sample_models/fashion_cnn.onnx ../shared/data/imagenet/squeezenet1.1.onnx --rate 0.5 --threads 1

Every perforable Conv gets a grid mask of the rate (compact rewrite, the default). Prints a Markdown
table per model: median latency over interleaved runs (the variants take turns, so load drifts hit them
alike), the ratio to the custom-op form, session creation time and file size; ``--reference`` adds one
onnx.reference run of the portable and expanded forms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_perforate  # noqa: E402
from onnx_perforate import masks  # noqa: E402
from onnx_perforate.portable import make_portable  # noqa: E402


def variants(path: Path, rate: float) -> dict:
    original = onnx.load(path)
    chosen = {r.name: masks.grid(r.output_shape[2:], rate) for r in onnx_perforate.inspect(original) if r.perforable}
    custom = onnx_perforate.rewrite(original, chosen)
    portable = onnx_perforate.rewrite(original, chosen, portable=True)
    return {
        "original (plain ORT)": (original, False),
        "custom ops (library)": (custom, True),
        "portable (library)": (portable, True),
        "portable (plain ORT)": (portable, False),
        "expanded (plain ORT)": (make_portable(portable, expand=True), False),
    }


def feeds_for(model: onnx.ModelProto, batch: int) -> dict:
    initializers = {t.name for t in model.graph.initializer}
    value = next(i for i in model.graph.input if i.name not in initializers)
    dims = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
    return {value.name: np.random.default_rng(0).uniform(0, 255, dims).astype(np.float32)}


def session(model: onnx.ModelProto, library: bool, threads: int) -> tuple[ort.InferenceSession, float]:
    options = onnx_perforate.session_options(threads, allow_spinning=False) if library else ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    start = time.perf_counter()
    created = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return created, time.perf_counter() - start


def bench(path: Path, args) -> None:
    forms = variants(path, args.rate)
    feeds = feeds_for(forms["original (plain ORT)"][0], args.batch)
    sessions, created = {}, {}
    for name, (model, library) in forms.items():
        sessions[name], created[name] = session(model, library, args.threads)
    expected = sessions["custom ops (library)"].run(None, feeds)[0]
    for name, sess in sessions.items():
        out = sess.run(None, feeds)[0]
        if name != "original (plain ORT)":
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=name)
        for _ in range(args.warmup):
            sess.run(None, feeds)
    times = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["custom ops (library)"])
    print(f"\n### {path.name}: grid r={args.rate} on every perforable Conv, batch {args.batch}, "
          f"{args.threads} thread(s), {args.repeats} interleaved runs\n")
    print("| form | median ms | / custom ops | session creation ms | file KiB |")
    print("|---|---:|---:|---:|---:|")
    for name, (model, _) in forms.items():
        median = statistics.median(times[name])
        print(f"| {name} | {median * 1e3:.3f} | {median / base:.2f} | {created[name] * 1e3:.0f} | "
              f"{model.ByteSize() / 1024:.0f} |")
    if args.reference:
        from onnx.reference import ReferenceEvaluator

        for name in ("portable (plain ORT)", "expanded (plain ORT)"):
            evaluator = ReferenceEvaluator(forms[name][0])
            start = time.perf_counter()
            evaluator.run(None, feeds)
            print(f"\nonnx.reference, {name.split()[0]} form: one run {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time one onnx.reference run")
    args = parser.parse_args()
    for path in args.models:
        if not path.is_file():
            print(f"skipping {path}: not found", file=sys.stderr)
            continue
        bench(path, args)


if __name__ == "__main__":
    main()
