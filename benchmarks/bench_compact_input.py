"""What reading a compact input costs: PerforatedConv on a compact X (through X_index) against the same
PerforatedConv on the full X that X stands for, one layer at a time.

In a compact rewrite a perforated layer whose input comes from another perforated layer reads that
layer's compact output [N, C, K_in] through X_index; the kernel interpolates it into its padded copy of
the input. The full-input column is the same convolution on the interpolated tensor, which the kernel
reads in place when the layer is unpadded (and copies only for the padding otherwise): the gap is what
the interpolation costs. Layers of the benchmark models (CIFAR-10 CNN, the bundled Fashion-MNIST CNN,
SqueezeNet 1.1's 3x3 expands), their output and input masks at the rates given. Both sessions run
interleaved in ORT (spinning off). Prints a Markdown table of medians.

    python benchmarks/bench_compact_input.py                  # one thread
    python benchmarks/bench_compact_input.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import masks, ops, runtime

# (name, batch, C, M, input H=W, padding, mask kind, producer's rate, this layer's rate)
LAYERS = [
    ("CIFAR conv2d_1 64x30x30->64", 32, 64, 64, 30, 0, "grid", 0.5, 0.5),
    ("CIFAR conv2d_3 128x12x12->128", 32, 128, 128, 12, 0, "grid", 0.5, 0.5),
    ("Fashion conv4 64x14x14->64", 32, 64, 64, 14, 1, "uniform", 0.6, 0.6),
    ("SqueezeNet fire2 expand3x3 16x55x55->64", 1, 16, 64, 55, 1, "grid", 0.75, 0.75),
    ("SqueezeNet fire4 expand3x3 32x27x27->128", 1, 32, 128, 27, 1, "grid", 0.5, 0.5),
    ("SqueezeNet fire9 expand3x3 64x13x13->256", 1, 64, 256, 13, 1, "uniform", 0.75, 0.75),
]


def layer_models(batch, c, m, hw, pad, kind, producer_rate, rate, rng):
    """(compact-input model, full-input model, compact X, full X) of one layer."""
    producer = np.asarray(masks.make(kind, (hw, hw), producer_rate, seed=3).array, bool)
    out_hw = hw + 2 * pad - 2
    mask = np.asarray(masks.make(kind, (out_hw, out_hw), rate, seed=3).array, bool)
    x_index = ops.nearest_index(producer)
    attrs = ops.ConvAttributes(kernel_shape=(3, 3), pads=(pad,) * 4, activation="Relu")
    weights = [numpy_helper.from_array((rng.standard_normal((m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b"),
               numpy_helper.from_array(mask, "mask")]
    compact = rng.standard_normal((batch, c, int(producer.sum()))).astype(np.float32)
    full = np.ascontiguousarray(ops.nn_interpolate_reference(compact, x_index))

    def model(inputs, x_shape, extra):
        graph = helper.make_graph([ops.make_perforated_conv_node(inputs, "yc", attrs, "conv")], "layer",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                                  [helper.make_tensor_value_info("yc", TensorProto.FLOAT, None)], weights + extra)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])

    return (model(["x", "w", "b", "mask", "x_index"], compact.shape, [numpy_helper.from_array(x_index, "x_index")]),
            model(["x", "w", "b", "mask"], full.shape, []), compact, full)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"# PerforatedConv on a compact input vs on the full input (onnxruntime {ort.__version__}, "
          f"{runtime.cpu_description()}, median of {args.repeats} interleaved runs)\n")
    print("| layer | batch | threads | full X ms | compact X ms | compact / full |")
    print("|---|---|---|---|---|---|")
    for name, batch, c, m, hw, pad, kind, producer_rate, rate in LAYERS:
        compact_model, full_model, compact, full = layer_models(batch, c, m, hw, pad, kind, producer_rate, rate, rng)
        for threads in args.threads:
            sessions = [runtime.session(full_model, threads), runtime.session(compact_model, threads)]
            got = sessions[1].run(None, {"x": compact})[0]
            expected = sessions[0].run(None, {"x": full})[0]
            if not np.array_equal(got, expected):
                raise SystemExit(f"{name}: the compact-input result differs from the full-input one")
            walls = runtime.time_interleaved(sessions, [{"x": full}, {"x": compact}], args.repeats, warmup=3).wall
            t_full, t_compact = (statistics.median(t) for t in walls)
            print(f"| {name} | {batch} | {threads} | {t_full * 1e3:.3f} | {t_compact * 1e3:.3f} | "
                  f"{t_compact / t_full:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
