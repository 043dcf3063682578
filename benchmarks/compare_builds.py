"""Two builds of the custom-op library, layer by layer: how a kernel change moves the time of single
PerforatedConv nodes, both libraries loaded in one process and their sessions interleaved.

    python benchmarks/compare_builds.py BEFORE.so AFTER.so                 # one thread
    python benchmarks/compare_builds.py BEFORE.so AFTER.so --threads 1 2

The layers are shapes of the benchmark models where the kernel's paths differ: compact inputs read
through X_index (CIFAR-10 CNN, Fashion-MNIST CNN), SqueezeNet 1.1's first layer (three input channels,
stride 2), 1x1 convolutions over a row of positions, as the compact rewrite runs them on compact
tensors ([N, C, 1, K] under an all-ones mask), and padded full inputs (bench_kernels.py's three layers,
a lightly perforated SqueezeNet expand3x3). Each AFTER output is checked against BEFORE's first.
Prints a Markdown table of medians and the AFTER / BEFORE ratio. ``--cold`` writes 64 MiB before every
timed run, as the rest of a network would between two runs of a layer: two sessions alone keep a batch's
input in L3 (SqueezeNet's conv1 at batch 32 reads 19 MB).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import masks, ops, runtime

# (name, batch, C, M, input (H, W), kernel, stride, padding, producer mask (kind, rate) or None for a full
# input, this layer's mask (kind, rate); "row": all-ones over a [1, K] row).
LAYERS = [
    ("CIFAR conv2d_1, compact input", 32, 64, 64, (30, 30), 3, 1, 0, ("grid", 0.5), ("grid", 0.5)),
    ("Fashion conv4, compact input", 32, 64, 64, (14, 14), 3, 1, 1, ("uniform", 0.6), ("uniform", 0.6)),
    ("SqueezeNet conv1", 1, 3, 64, (224, 224), 3, 2, 0, None, ("grid", 0.75)),
    ("SqueezeNet conv1", 32, 3, 64, (224, 224), 3, 2, 0, None, ("grid", 0.75)),
    ("1x1 16 -> 64 over 756 positions", 1, 16, 64, (1, 756), 1, 1, 0, None, ("row", 0.0)),
    ("1x1 16 -> 64 over 756 positions", 32, 16, 64, (1, 756), 1, 1, 0, None, ("row", 0.0)),
    ("1x1 64 -> 64 over 182 positions", 32, 64, 64, (1, 182), 1, 1, 0, None, ("row", 0.0)),
    ("1x1 256 -> 64 over 42 positions", 32, 256, 64, (1, 42), 1, 1, 0, None, ("row", 0.0)),
    # SqueezeNet's conv10 (weights larger than L2) on compact inputs (grid r = 0.75) and unperforated
    ("1x1 512 -> 1000 over 42 positions", 1, 512, 1000, (1, 42), 1, 1, 0, None, ("row", 0.0)),
    ("1x1 512 -> 1000 over 42 positions", 32, 512, 1000, (1, 42), 1, 1, 0, None, ("row", 0.0)),
    ("1x1 512 -> 1000 over 169 positions", 1, 512, 1000, (1, 169), 1, 1, 0, None, ("row", 0.0)),
    # full padded inputs: the three layers of bench_kernels.py, and a SqueezeNet expand3x3 lightly perforated
    ("vgg-conv3, full mask", 1, 128, 192, (56, 56), 3, 1, 1, None, ("uniform", 0.0)),
    ("vgg-conv4, full mask", 1, 256, 256, (28, 28), 3, 1, 1, None, ("uniform", 0.0)),
    ("alexnet-conv4, full mask", 1, 192, 384, (13, 13), 3, 1, 1, None, ("uniform", 0.0)),
    ("vgg-conv3, r = 0.5", 1, 128, 192, (56, 56), 3, 1, 1, None, ("uniform", 0.5)),
    ("vgg-conv3, r = 0.75", 1, 128, 192, (56, 56), 3, 1, 1, None, ("uniform", 0.75)),
    ("vgg-conv4, r = 0.5", 1, 256, 256, (28, 28), 3, 1, 1, None, ("uniform", 0.5)),
    ("vgg-conv4, r = 0.75", 1, 256, 256, (28, 28), 3, 1, 1, None, ("uniform", 0.75)),
    ("alexnet-conv4, r = 0.5", 1, 192, 384, (13, 13), 3, 1, 1, None, ("uniform", 0.5)),
    ("alexnet-conv4, r = 0.75", 1, 192, 384, (13, 13), 3, 1, 1, None, ("uniform", 0.75)),
    ("SqueezeNet fire2 expand3x3, r = 0.3", 1, 16, 64, (55, 55), 3, 1, 1, None, ("uniform", 0.3)),
]


def layer_mask(kind: str, shape, rate: float) -> np.ndarray:
    """A mask of masks.make's kinds, or "row": every position of a [1, K] row."""
    if kind == "row":
        return np.ones(shape, bool)
    return np.asarray(masks.make(kind, shape, rate, seed=3).array, bool)


def layer_model(batch, c, m, hw, kernel, stride, pad, producer, own, rng):
    """(model, feed) of one PerforatedConv layer."""
    out_hw = tuple((size + 2 * pad - kernel) // stride + 1 for size in hw)
    mask = layer_mask(own[0], out_hw, own[1])
    attrs = ops.ConvAttributes(kernel_shape=(kernel, kernel), strides=(stride, stride), pads=(pad,) * 4,
                               activation="Relu")
    inputs = ["x", "w", "b", "mask"]
    initializers = [
        numpy_helper.from_array((rng.standard_normal((m, c, kernel, kernel)) / np.sqrt(c * kernel ** 2)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b"),
        numpy_helper.from_array(mask, "mask"),
    ]
    x_shape = (batch, c) + tuple(hw)
    if producer is not None:
        producer_mask = layer_mask(producer[0], hw, producer[1])
        inputs.append("x_index")
        initializers.append(numpy_helper.from_array(ops.nearest_index(producer_mask), "x_index"))
        x_shape = (batch, c, int(producer_mask.sum()))
    graph = helper.make_graph([ops.make_perforated_conv_node(inputs, "yc", attrs, "conv")], "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("yc", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def build_session(model, library: str, threads: int):
    options = runtime.session_options(threads, custom_ops=False)
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_runs(sessions, feed, repeats: int, cold: bool) -> list[list[float]]:
    """Seconds of each session's runs, taking turns (after 3 untimed runs each)."""
    if not cold:
        return runtime.time_interleaved(sessions, feed, repeats, warmup=3).wall
    sweep = np.empty(16 << 20, np.float32)  # 64 MiB, more than the last-level cache
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    walls = [[] for _ in sessions]
    for _ in range(repeats):
        for s, wall in zip(sessions, walls):
            sweep.fill(1.0)
            start = time.perf_counter()
            s.run(None, feed)
            wall.append(time.perf_counter() - start)
    return walls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the custom-op library before the change (.so)")
    parser.add_argument("after", help="the custom-op library after the change (.so)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per session (batch 1: 5x as many)")
    parser.add_argument("--cold", action="store_true", help="evict the caches before every timed run")
    parser.add_argument("--only", metavar="TEXT", help="only the layers whose name contains TEXT")
    args = parser.parse_args(argv)
    layers = [layer for layer in LAYERS if args.only is None or args.only in layer[0]]
    if not layers:
        raise SystemExit(f"error: no layer's name contains {args.only!r}")
    rng = np.random.default_rng(0)
    print(f"# PerforatedConv layers, two builds (onnxruntime {ort.__version__}, {runtime.cpu_description()}; "
          "medians of interleaved runs)\n")
    print(f"before: {args.before}  \nafter: {args.after}\n")
    print("| layer | batch | threads | before ms | after ms | after / before |")
    print("|---|---|---|---|---|---|")
    for name, batch, c, m, hw, kernel, stride, pad, producer, own in layers:
        model, feed = layer_model(batch, c, m, hw, kernel, stride, pad, producer, own, rng)
        for threads in args.threads:
            sessions = [build_session(model, library, threads) for library in (args.before, args.after)]
            before, after = (s.run(None, feed)[0] for s in sessions)
            scale = float(np.abs(before).max()) or 1.0
            if before.shape != after.shape or not np.allclose(after, before, rtol=1e-4, atol=1e-4 * scale):
                raise SystemExit(f"{name}: the two builds disagree (largest difference "
                                 f"{float(np.abs(after - before).max()) if before.shape == after.shape else 'shape'})")
            repeats = args.repeats * (5 if batch == 1 else 1)
            t_before, t_after = (statistics.median(t) for t in time_runs(sessions, feed, repeats, args.cold))
            print(f"| {name} | {batch} | {threads} | {t_before * 1e3:.3f} | {t_after * 1e3:.3f} | "
                  f"{t_after / t_before:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
