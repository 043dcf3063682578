"""GPU benchmark: cuDNN convolution vs PerforatedConv + NNInterpolate (our CUDA kernels).

    python benchmarks/bench_cuda.py            # all layers, batch 1/8/64, r = 0/0.5/0.75
    python benchmarks/bench_cuda.py --quick    # fewer repeats, batch 1/8 (unless --batches)

Both sides run in FP32: cuDNN with TF32 off (``torch.backends.cudnn.allow_tf32 = False``) and
``cudnn.benchmark = True`` (it picks its fastest algorithm per shape, Winograd/FFT included); ours is
plain FP32 FMA. Masks are uniform random (fixed seed) with round((1 - r) * Ho * Wo) computed positions;
the interpolation index maps every output position to the nearest computed one (Euclidean, ties to
the smallest row-major index). Times are CUDA-event times on one stream after warm-up, median over
repeats; "ours" is the perforated convolution plus the interpolation back to the full output, i.e. the
drop-in replacement of the convolution. "of ideal" is the speedup divided by 1 / (1 - r).

The kernels library is onnx_perforate.cuda_kernels_library_path() (ONNX_PERFORATE_CUDA_KERNELS, the
package's lib folder, or next to the CUDA ops library) unless --library names one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

from onnx_perforate import cuda_kernels, cuda_kernels_library_path, masks
from onnx_perforate.ops import nearest_index

# (C, H=W, M): 3x3 convolutions, stride 1, pad 1.
LAYERS = [(128, 56, 192), (256, 28, 256), (192, 13, 384)]
RATES = [0.0, 0.5, 0.75]


def time_ms(torch, fn, warmup: int, repeats: int, inner: int) -> float:
    """Median over repeats of the mean time of `inner` back-to-back calls, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 only, fewer repeats")
    parser.add_argument("--library", help="path of libonnx_perforate_cuda_kernels.so")
    parser.add_argument("--batches", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to PyTorch")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False  # FP32 against FP32
    torch.backends.cuda.matmul.allow_tf32 = False
    library = args.library or cuda_kernels_library_path()
    lib = cuda_kernels.load(library)
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 64])
    warmup, repeats = (5, 7) if args.quick else (20, 25)

    def check(status: int, what: str) -> None:
        if status:
            raise RuntimeError(f"{what}: {lib.onnx_perforate_cuda_error_string(status).decode()}")

    sms, big_blocks_per_sm = cuda_kernels.device_conv_config(lib)
    deterministic = os.environ.get("ONNX_PERFORATE_CUDA_DETERMINISTIC", "0") not in ("", "0")  # as the library reads it
    print(f"device: {torch.cuda.get_device_name()} ({sms} SMs), torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, library: {library}")
    print()
    print("| layer (C, HxW -> M) | batch | r | kernel | cuDNN ms | ours ms | speedup | ideal 1/(1-r) | of ideal "
          "| max abs err (r=0) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    for c, hw, m in LAYERS:
        weight = torch.randn((m, c, 3, 3), device="cuda", generator=gen) / (3 * c**0.5)
        bias = torch.randn((m,), device="cuda", generator=gen)
        for n in batches:
            x = torch.randn((n, c, hw, hw), device="cuda", generator=gen)
            inner = max(1, min(50, int(2e10 / (2 * n * m * c * 9 * hw * hw))))  # ~>1 ms per timed loop
            reference = F.conv2d(x, weight, bias, padding=1)
            t_cudnn = time_ms(torch, lambda: F.conv2d(x, weight, bias, padding=1), warmup, repeats, inner)
            for rate in RATES:
                mask = np.asarray(masks.uniform((hw, hw), rate, seed=args.seed))
                table = torch.from_numpy(
                    cuda_kernels.gather_table(lib, hw, hw, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), mask)).cuda()
                index = torch.from_numpy(nearest_index(mask).astype(np.int32)).cuda()
                count = table.shape[1]
                kernel, splits = cuda_kernels.conv_launch(lib, n, c, m, 1, 3, 3, count, sms, big_blocks_per_sm,
                                                          deterministic)
                kernel += f", {splits} splits" if splits > 1 else ""
                yc = torch.empty((n, m, count), device="cuda")
                y = torch.empty((n, m, hw, hw), device="cuda")

                def ours():
                    stream = torch.cuda.current_stream().cuda_stream
                    check(lib.onnx_perforate_cuda_perforated_conv(
                        x.data_ptr(), weight.data_ptr(), bias.data_ptr(), table.data_ptr(), n, c, hw, hw, m, 1, 3, 3,
                        count, 0, 0.0, 0.0, 0.0, yc.data_ptr(), stream), "perforated_conv")
                    check(lib.onnx_perforate_cuda_nn_interpolate(
                        yc.data_ptr(), index.data_ptr(), n * m, count, hw * hw, y.data_ptr(), stream), "nn_interpolate")

                t_ours = time_ms(torch, ours, warmup, repeats, inner)
                error = ""
                if rate == 0.0:
                    ours()
                    torch.cuda.synchronize()
                    error = f"{(y - reference).abs().max().item():.1e}"
                ideal = 1.0 / (1.0 - rate)
                speedup = t_cudnn / t_ours
                print(f"| {c}, {hw}x{hw} -> {m} | {n} | {rate:g} | {kernel} | {t_cudnn:.3f} | {t_ours:.3f} | {speedup:.2f}x | "
                      f"{ideal:.1f}x | {speedup / ideal:.0%} | {error} |", flush=True)
            del x, reference
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
