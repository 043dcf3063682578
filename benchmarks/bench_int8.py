"""PerforatedQLinearConv against ONNX Runtime's own INT8 convolution: the three benchmark layers of
bench_kernels.py as QLinearConv (uint8 x int8, per-channel weights), and SqueezeNet 1.1 quantized with
onnxruntime.quantization.quantize_static (QDQ) with grid masks on every Conv.

Sessions are interleaved (medians) with spinning off. Prints Markdown tables: speed-up over ORT and the
fraction of the theoretical speed-up (1/(1-r) per layer, the Conv-MAC reduction for the network).

    python benchmarks/bench_int8.py --threads 1 --repeats 30

``--only interpolate``: the uint8 NNInterpolate alone on SqueezeNet's output sizes, against
``--baseline-library`` (another build of the library) in the same process when given.

``--only table``: SqueezeNet 1.1 as float32, INT8 (quantize_static, QDQ, per-channel), INT8 + perforation
tuned by ``onnx_perforate.tune`` on the INT8 model, and INT8 fed smaller images: speed (interleaved
medians), val100 top-1/top-5 and top-1 agreement with float32 on held-out images. Data split: samples1000
(sorted, one image per class) even-indexed images calibrate (every 32nd quantize_static, every 16th the
tuner), odd-indexed ones are held out; val100 is used only for accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, version_converter

from onnx_perforate import masks, ops, runtime
from onnx_perforate.graph import conv_geometry, infer_shapes
from onnx_perforate.rewrite import rewrite_with_report

LAYERS = [  # (name, C, H=W, M): bench_kernels.py's layers, 3x3, padding 1
    ("vgg-conv3 128x56x56->192", 128, 56, 192),
    ("vgg-conv4 256x28x28->256", 256, 28, 256),
    ("alexnet-conv4 192x13x13->384", 192, 13, 384),
]
QLINEAR_INPUTS = ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point", "B"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet"


STAT = {"median": statistics.median, "min": min}


def median_times(sessions, feed, repeats, stat="median"):
    """Median (or minimum) wall time of each session, timed interleaved (runtime.time_interleaved)."""
    return [STAT[stat](t) for t in runtime.time_interleaved(sessions, feed, repeats, warmup=3).wall]


def layer_models(c, hw, m, mask, rng, w_zero_point=0, activations=np.uint8):
    """QLinearConv and PerforatedQLinearConv + NNInterpolate of one layer; ``activations``: uint8 (zero
    points 128) or int8 (zero points 0, the same real values)."""
    zero = activations(128 if activations == np.uint8 else 0)
    params = {
        "x_scale": np.float32(0.02), "x_zero_point": zero,
        "w": rng.integers(-127, 128, (m, c, 3, 3), dtype=np.int8),
        "w_scale": rng.uniform(0.001, 0.01, m).astype(np.float32), "w_zero_point": np.full(m, w_zero_point, np.int8),
        "y_scale": np.float32(2.0), "y_zero_point": zero,
        "B": rng.integers(-1000, 1000, m).astype(np.int32),
    }
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()]
    attrs = ops.ConvAttributes(kernel_shape=(3, 3), pads=(1, 1, 1, 1))

    element = helper.np_dtype_to_tensor_dtype(np.dtype(activations))

    def model(nodes, extra=()):
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", element, [1, c, hw, hw])],
                                  [helper.make_tensor_value_info("y", element, None)], inits + list(extra))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])

    base = model([helper.make_node("QLinearConv", QLINEAR_INPUTS, ["y"], **attrs.to_onnx())])
    perforated = model(
        [ops.make_perforated_qlinear_conv_node(QLINEAR_INPUTS + ["mask"], "yc", attrs, "conv"),
         ops.make_nn_interpolate_node("yc", "index", "y", "conv/interpolate")],
        [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(ops.nearest_index(mask), "index")])
    return base, perforated


def bench_layers(args, rng):
    print("| layer | threads | r | ORT QLinearConv ms | perforated ms | speed-up | theoretical | fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c, hw, m in LAYERS:
        activations = np.dtype(args.activations).type
        x = rng.integers(np.iinfo(activations).min, np.iinfo(activations).max + 1, (1, c, hw, hw), dtype=activations)
        for rate in args.rates:
            mask = np.asarray(masks.uniform((hw, hw), rate, seed=1))
            base, perforated = layer_models(c, hw, m, mask, rng, args.w_zero_point, activations)
            for threads in args.threads:
                t_base, t_perf = median_times([runtime.session(base, threads), runtime.session(perforated, threads)],
                                              {"x": x}, args.repeats, args.stat)
                theoretical = 1 / mask.mean()
                print(f"| {name} | {threads} | {rate:.2f} | {t_base * 1e3:.3f} | {t_perf * 1e3:.3f} | "
                      f"{t_base / t_perf:.2f}x | {theoretical:.2f}x | {t_base / t_perf / theoretical:.0%} |", flush=True)


INTERPOLATE_SHAPES = [  # SqueezeNet 1.1's uint8 Conv outputs (channels, H=W) that NNInterpolate fills
    ("conv1 64x111x111", 64, 111), ("fire2 expand 64x55x55", 64, 55), ("fire4 expand 128x27x27", 128, 27),
    ("fire8 expand 256x13x13", 256, 13),
]


def bench_interpolate(args, rng):
    """NNInterpolate on uint8 alone (grid masks), with the library in use and, side by side in the same
    process (interleaved), with ``--baseline-library`` when given."""
    import onnxruntime as ort

    def session(model, path=None):
        options = runtime.session_options(args.threads[0], custom_ops=path is None)
        if path is not None:
            options.register_custom_ops_library(path)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    baseline = args.baseline_library
    print("| uint8 NNInterpolate | r | K | " + ("baseline ms | " if baseline else "") + "ms |"
          + (" speed-up |" if baseline else ""))
    print("|---|---|---|" + ("---|" if baseline else "") + "---|" + ("---|" if baseline else ""))
    for name, c, hw in INTERPOLATE_SHAPES:
        for rate in args.rates:
            mask = np.asarray(masks.grid((hw, hw), rate))
            k = int(mask.sum())
            graph = helper.make_graph(
                [ops.make_nn_interpolate_node("yc", "index", "y", "interpolate")], "interpolate",
                [helper.make_tensor_value_info("yc", TensorProto.UINT8, [1, c, k])],
                [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                [numpy_helper.from_array(ops.nearest_index(mask), "index")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
            sessions = ([session(model, baseline)] if baseline else []) + [session(model)]
            times = median_times(sessions, {"yc": rng.integers(0, 256, (1, c, k), dtype=np.uint8)}, args.repeats,
                                 args.stat)
            cells = " | ".join(f"{t * 1e3:.4f}" for t in times)
            ratio = f" {times[0] / times[1]:.2f}x |" if baseline else ""
            print(f"| {name} | {1 - mask.mean():.2f} | {k} | {cells} |{ratio}", flush=True)


def samples1000(indices) -> np.ndarray:
    """The preprocessed samples1000 images at ``indices`` (sorted file order)."""
    from onnx_perforate import data

    images = data.load_folder(SHARED / "samples1000", data.PRESETS["caffe"])
    return np.concatenate([images.load(i, i + 1) for i in indices])


def quantized_squeezenet(folder: Path, x: np.ndarray | None = None, activations: str = "uint8") -> onnx.ModelProto:
    """SqueezeNet 1.1 converted to opset 13 with a free batch size, then quantize_static (QDQ, per-channel int8 weights, uint8
    or int8 activations) calibrated on ``x`` (default: 8 samples1000 images, every 25th of the first 200)."""
    from onnxruntime import quantization

    if x is None:
        x = samples1000(range(0, 200, 25))
    source = folder / "squeezenet13.onnx"
    model = version_converter.convert_version(onnx.load(str(SHARED / "squeezenet1.1.onnx")), 13)
    next(v for v in model.graph.input if v.name == "data_0").type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"  # any batch (evaluation, tuning)
    model.graph.ClearField("value_info")
    onnx.save(model, source)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"data_0": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    quantization.quantize_static(str(source), str(folder / "q.onnx"), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, weight_type=quantization.QuantType.QInt8,
                                 activation_type=quantization.QuantType.QInt8 if activations == "int8"
                                 else quantization.QuantType.QUInt8)
    return onnx.load(str(folder / "q.onnx"))


def bench_squeezenet(args):
    if not (SHARED / "squeezenet1.1.onnx").is_file():
        print(f"\n(SqueezeNet skipped: {SHARED} is absent)")
        return
    with tempfile.TemporaryDirectory() as folder:
        int8 = quantized_squeezenet(Path(folder), activations=args.activations)
    shapes = infer_shapes(int8)
    geometries = [conv_geometry(n, shapes) for n in int8.graph.node if n.op_type == "Conv"]
    x = np.random.default_rng(0).uniform(-120, 140, (1, 3, 224, 224)).astype(np.float32)
    print("\n| SqueezeNet 1.1 INT8 (QDQ) | threads | INT8 ms | perforated ms | speed-up | Conv-MAC reduction | fraction |")
    print("|---|---|---|---|---|---|---|")
    for rate in args.rates:
        chosen = {g.key: np.asarray(masks.grid(g.out_hw, rate)) for g in geometries}
        perforated, report = rewrite_with_report(int8, chosen)
        for threads in args.threads:
            t_base, t_perf = median_times([runtime.session(int8, threads), runtime.session(perforated, threads)],
                                          {"data_0": x}, args.repeats, args.stat)
            print(f"| grid r={rate:.2f} on every Conv | {threads} | {t_base * 1e3:.2f} | {t_perf * 1e3:.2f} | "
                  f"{t_base / t_perf:.2f}x | {report.mac_reduction:.2f}x | "
                  f"{t_base / t_perf / report.mac_reduction:.2f} |", flush=True)


def predictions(model, x, threads, batch=25):
    session = runtime.session(model, threads)
    out = np.concatenate([session.run(None, {"data_0": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return np.argsort(-out.reshape(len(x), -1), axis=1)[:, :5]


def bench_table(args):
    """The SqueezeNet table: float32, INT8, INT8 + tuned perforation, INT8 + resize (see the docstring)."""
    from onnx_perforate import data, tune
    from onnx_perforate.tuning import ImageResizer, resized_input_model

    if not (SHARED / "squeezenet1.1.onnx").is_file():
        print(f"\n(SqueezeNet table skipped: {SHARED} is absent)")
        return
    with tempfile.TemporaryDirectory() as folder:
        int8 = quantized_squeezenet(Path(folder), samples1000(range(0, 1000, 32)))
        float32 = onnx.load(str(Path(folder) / "squeezenet13.onnx"))
    tuning_x = samples1000(range(0, 1000, 16))
    held_out = samples1000(range(1, 1000, 2))
    val = data.load_folder(SHARED / "val100", data.PRESETS["caffe"])
    val_x, val_y = val.load(0, val.size), val.labels
    print(f"\ntuning INT8 SqueezeNet on {len(tuning_x)} calibration images (ladder {args.ladder}, "
          f"max agreement drop {args.max_drop})", flush=True)
    result = tune(int8, [{"data_0": tuning_x[i:i + 16]} for i in range(0, len(tuning_x), 16)], ladder=args.ladder,
                  max_accuracy_drop=args.max_drop, subset_size=None, threads=1, repeats=args.repeats,
                  baselines=False, progress=True)
    print(result.summary(), flush=True)
    resizer = ImageResizer("NCHW")
    rows = [("float32", float32, None), ("INT8 (QDQ, per-channel)", int8, None),
            (f"INT8 + perforation (tuned, {len(result.masks)} Convs)", result.model, None)]
    rows += [(f"INT8 + resize to {s}x{s}", resized_input_model(int8, (s, s), "NCHW"), (s, s)) for s in args.sizes]
    reference = predictions(float32, held_out, 1)[:, 0]
    timing = np.random.default_rng(0).uniform(-120, 140, (1, 3, 224, 224)).astype(np.float32)
    feeds = [{"data_0": timing if size is None else resizer(timing, size)} for _, _, size in rows]
    sessions = [runtime.session(model, args.threads[0]) for _, model, _ in rows]
    wall = runtime.time_interleaved(sessions, feeds, args.repeats, warmup=3).wall
    times = [STAT[args.stat](t) for t in wall]
    print(f"\n| SqueezeNet 1.1 | ms ({args.threads[0]} thread) | speed-up vs float32 | vs INT8 | val100 top-1 | "
          "val100 top-5 | held-out agreement with float32 |")
    print("|---|---|---|---|---|---|---|")
    for (label, model, size), t in zip(rows, times):
        val_in = val_x if size is None else resizer(val_x, size)
        held_in = held_out if size is None else resizer(held_out, size)
        top = predictions(model, val_in, 1)
        top1, top5 = (top[:, 0] == val_y).mean(), (top == val_y[:, None]).any(axis=1).mean()
        agreement = (predictions(model, held_in, 1)[:, 0] == reference).mean()
        print(f"| {label} | {t * 1e3:.2f} | {times[0] / t:.2f}x | {times[1] / t:.2f}x | {top1:.2f} | {top5:.2f} | "
              f"{agreement:.3f} |", flush=True)
    print(f"\nheld-out: {len(held_out)} odd-indexed samples1000 images; calibration: every 32nd "
          f"(quantize_static) and every 16th (tune) samples1000 image, all even-indexed; tuned rates: "
          f"{ {k: m.rate for k, m in result.masks.items()} }")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--stat", choices=sorted(STAT), default="median",
                        help="per session: median of the interleaved runs, or min (on a loaded machine)")
    parser.add_argument("--only", choices=["layers", "squeezenet", "table", "interpolate"], default=None)
    parser.add_argument("--w-zero-point", type=int, default=0,
                        help="layers: the weights' zero point (nonzero: asymmetric weights, in both models)")
    parser.add_argument("--activations", choices=["uint8", "int8"], default="uint8",
                        help="layers, squeezenet: the activation type (int8: S8S8, in both models)")
    parser.add_argument("--baseline-library", default=None,
                        help="interpolate: another build of the custom-op library, timed side by side")
    parser.add_argument("--ladder", type=float, nargs="+", default=[0.0, 0.35, 0.5, 0.7],
                        help="table: the tuner's ladder")
    parser.add_argument("--max-drop", type=float, default=0.05,
                        help="table: the tuner's budget in top-1 agreement with the INT8 model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 160], help="table: resized input sizes")
    args = parser.parse_args(argv)
    print(f"# PerforatedQLinearConv vs ORT INT8 (onnxruntime {ort.__version__}, {runtime.cpu_description()}, "
          f"{args.stat} of {args.repeats})\n")
    if args.only in (None, "layers"):
        bench_layers(args, np.random.default_rng(0))
    if args.only in (None, "squeezenet"):
        bench_squeezenet(args)
    if args.only == "table":  # minutes: quantizes, tunes and evaluates on real images
        bench_table(args)
    if args.only == "interpolate":
        bench_interpolate(args, np.random.default_rng(0))


if __name__ == "__main__":
    sys.exit(main())
