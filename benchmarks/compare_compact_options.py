"""The compact rewrite of one model under two settings of its cost model, timed end to end: how a change
of a `CompactOptions` field moves a whole network, both rewrites (same masks) and the original
interleaved in one process.

    python benchmarks/compare_compact_options.py ../shared/data/imagenet/squeezenet1.1.onnx \
        --mask uniform --rate 0.3 --layers all-3x3 --before pool_reorder_cost=0

``--before`` and ``--after`` take ``FIELD=VALUE`` pairs (Python literals); a field not given keeps its
default. Prints which ops the two rewrites differ in and a Markdown table of interleaved medians.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import statistics
import sys
from pathlib import Path

import onnx

import onnx_perforate
from onnx_perforate import runtime
from onnx_perforate.passes.compact import CompactOptions
from onnx_perforate.rewrite import RewriteOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import choose_masks, dynamic_batch, latency  # noqa: E402


def compact_options(pairs: list[str]) -> CompactOptions:
    known = {f.name for f in dataclasses.fields(CompactOptions)}
    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"error: {pair!r} is not FIELD=VALUE with FIELD one of {sorted(known)}")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"error: {text!r} (for {name}) is not a Python literal") from None
    return CompactOptions(**values)


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--mask", default="grid", choices=["grid", "uniform", "pooling"])
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--layers", default="all", help="as bench_models.py's --layers")
    p.add_argument("--before", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--after", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args(argv)
    settings = {"before": compact_options(args.before), "after": compact_options(args.after)}

    original = dynamic_batch(onnx.load(str(args.model)))
    chosen = choose_masks(original, args.mask, args.rate, args.layers)
    models = {"original": original}
    for key, options in settings.items():
        models[key] = onnx_perforate.rewrite(original, chosen, RewriteOptions(compact_options=options))
    before, after = op_counts(models["before"]), op_counts(models["after"])
    changed = {op: (before[op], after[op]) for op in sorted(before | after) if before[op] != after[op]}
    print(f"# {args.model.name}: {args.mask} r={args.rate} on {len(chosen)} Conv ({args.layers}); "
          f"{runtime.cpu_description()}; median of {args.repeats} interleaved runs")
    print(f"# before: {args.before or 'defaults'}; after: {args.after or 'defaults'}")
    if not changed:
        print("the two rewrites are the same model: nothing to time")
        return 0
    print("# ops (before -> after): " + ", ".join(f"{op} {b} -> {a}" for op, (b, a) in changed.items()))
    print()
    print("| threads | batch | original ms | before ms | after ms | before speed-up | after speed-up | before ms / after ms |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for batch in args.batch:
            wall, _ = latency(models, threads, batch, args.repeats, stat=statistics.median)
            o, b, a = wall["original"], wall["before"], wall["after"]
            print(f"| {threads} | {batch} | {o:.3f} | {b:.3f} | {a:.3f} | {o / b:.3f}x | {o / a:.3f}x | {b / a:.3f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
