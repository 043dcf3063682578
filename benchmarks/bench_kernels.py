"""PerforatedConv + NNInterpolate against ONNX Runtime's own Conv, one layer at a time (at r = 0 the
full-mask PerforatedConv alone: its output is the convolution's).

Both run in ORT at ORT_ENABLE_ALL (ORT's NCHWc Conv path included) with the same intra-op thread
count and spinning off, interleaved so that machine noise hits both alike. Masks are uniform random
at rate r (fraction of positions skipped). Prints a Markdown table: median latency, speedup over
ORT's Conv, and the fraction of the theoretical speedup 1/(1-r) reached.

    python benchmarks/bench_kernels.py                # default layers, r = 0, .25, .5, .75, 1 and 2 threads
    python benchmarks/bench_kernels.py --quick        # fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import masks, ops, runtime

# (name, C, H=W, M): AlexNet- and VGG-like 3x3 layers, padding 1.
LAYERS = [
    ("vgg-conv3 128x56x56->192", 128, 56, 192),
    ("vgg-conv4 256x28x28->256", 256, 28, 256),
    ("alexnet-conv4 192x13x13->384", 192, 13, 384),
]


def conv_model(c, hw, m, batch, rng):
    w = (rng.standard_normal((m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, m, hw, hw])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w, b


def perforated_model(c, hw, m, batch, w, b, mask):
    """PerforatedConv + NNInterpolate; with a full mask PerforatedConv alone, whose [N, M, H*W] output
    already is the convolution's (how the compact rewrite runs an unperforated layer as our op)."""
    attrs = ops.ConvAttributes(kernel_shape=(3, 3), pads=(1, 1, 1, 1))
    full = bool(mask.all())
    nodes = [ops.make_perforated_conv_node(["x", "w", "b", "mask"], "yc", attrs, "conv")]
    initializers = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(mask, "mask")]
    if not full:
        nodes.append(ops.make_nn_interpolate_node("yc", "index", "y", "conv/interpolate"))
        initializers.append(numpy_helper.from_array(ops.nearest_index(mask), "index"))
    output = helper.make_tensor_value_info("yc", TensorProto.FLOAT, [batch, m, hw * hw]) if full else \
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, m, hw, hw])
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
                              [output], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])


def time_medians(sessions, feed, repeats) -> list[float]:
    return [statistics.median(t) for t in runtime.time_interleaved(sessions, feed, repeats, warmup=3).wall]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="10 repeats")
    args = parser.parse_args(argv)
    repeats = 10 if args.quick else args.repeats
    rng = np.random.default_rng(0)

    print(f"# PerforatedConv + NNInterpolate vs ORT Conv (onnxruntime {ort.__version__}, batch {args.batch}, "
          f"{runtime.cpu_description()}, median of {repeats})\n")
    print("| layer | threads | r | ORT Conv ms | perforated ms | speedup | theoretical | fraction |")
    print("|---|---|---|---|---|---|---|---|")
    worst, worst_dense = 1.0, 1.0
    for name, c, hw, m in LAYERS:
        base, w, b = conv_model(c, hw, m, args.batch, rng)
        x = runtime.timing_array((args.batch, c, hw, hw))
        for threads in args.threads:
            base_session = runtime.session(base, threads)
            for rate in args.rates:
                mask = np.asarray(masks.uniform((hw, hw), rate, seed=int(rng.integers(2**31))))
                perforated = runtime.session(perforated_model(c, hw, m, args.batch, w, b, mask), threads)
                t_base, t_perf = time_medians([base_session, perforated], {"x": x}, repeats)
                achieved_rate = 1 - mask.mean()
                theoretical = 1 / (1 - achieved_rate)
                speedup = t_base / t_perf
                fraction = speedup / theoretical
                if rate >= 0.25:
                    worst = min(worst, fraction)
                else:
                    worst_dense = min(worst_dense, fraction)
                print(f"| {name} | {threads} | {rate:.2f} | {t_base * 1e3:.3f} | {t_perf * 1e3:.3f} | "
                      f"{speedup:.2f}x | {theoretical:.2f}x | {fraction:.0%} |", flush=True)
    print(f"\nworst fraction of the theoretical speedup at r >= 0.25: {worst:.0%} (target 90%); "
          f"worst speed relative to ORT's Conv at r = 0 (full mask, no interpolation): {worst_dense:.0%} (target 97%)")


if __name__ == "__main__":
    sys.exit(main())
