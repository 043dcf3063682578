"""GPU benchmark: cuDNN convolution vs PerforatedConv + NNInterpolate (our CUDA kernels).

    python benchmarks/bench_cuda.py            # all layers, batch 1/8/64, r = 0/0.5/0.75
    python benchmarks/bench_cuda.py --quick    # fewer repeats, batch 1/8

Both sides run in FP32: cuDNN with TF32 off (``torch.backends.cudnn.allow_tf32 = False``) and
``cudnn.benchmark = True`` (it picks its fastest algorithm per shape, Winograd/FFT included); ours is
plain FP32 FMA. Masks are uniform random (fixed seed) with round((1 - r) * Ho * Wo) computed positions;
the interpolation index maps every output position to the nearest computed one (Euclidean, ties to
the smallest row-major index). Times are CUDA-event times on one stream after warm-up, median over
repeats; "ours" is the perforated convolution plus the interpolation back to the full output, i.e. the
drop-in replacement of the convolution. "of ideal" is the speedup divided by 1 / (1 - r).

The kernels library is found through ONNX_PERFORATE_CUDA_KERNELS, next to
onnx_perforate.cuda_library_path(), or in onnx_perforate/lib or build/*/cuda of this checkout.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KERNELS_NAME = "libonnx_perforate_cuda_kernels.so"

# (C, H=W, M): 3x3 convolutions, stride 1, pad 1.
LAYERS = [(128, 56, 192), (256, 28, 256), (192, 13, 384)]
RATES = [0.0, 0.5, 0.75]


def find_library(explicit: str | None) -> Path:
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("ONNX_PERFORATE_CUDA_KERNELS"):
        candidates.append(Path(os.environ["ONNX_PERFORATE_CUDA_KERNELS"]))
    try:
        sys.path.insert(0, str(ROOT))
        import onnx_perforate

        path = onnx_perforate.cuda_library_path()
        if path:
            candidates.append(Path(path).parent / KERNELS_NAME)
        candidates.append(Path(onnx_perforate.__file__).resolve().parent / "lib" / KERNELS_NAME)
    except Exception:  # noqa: BLE001 - the package is optional here
        pass
    candidates += [ROOT / "onnx_perforate" / "lib" / KERNELS_NAME] + sorted(ROOT.glob(f"build/*/cuda/{KERNELS_NAME}"))
    for path in candidates:
        if path.is_file():
            return path
    sys.exit(f"{KERNELS_NAME} not found: build with ONNX_PERFORATE_CUDA=ON pip install . "
             "or set ONNX_PERFORATE_CUDA_KERNELS")


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i32, i64, f32, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.onnx_perforate_cuda_perforated_conv.argtypes = [vp, vp, vp, vp] + [i32] * 10 + [f32, f32, f32, vp, vp]
    lib.onnx_perforate_cuda_perforated_conv.restype = i32
    lib.onnx_perforate_cuda_nn_interpolate.argtypes = [vp, vp, i64, i32, i32, vp, vp]
    lib.onnx_perforate_cuda_nn_interpolate.restype = i32
    lib.onnx_perforate_cuda_error_string.argtypes = [i32]
    lib.onnx_perforate_cuda_error_string.restype = ctypes.c_char_p
    lib.onnx_perforate_build_gather_table.argtypes = (
        [i64] * 12 + [vp, i64, i64, vp, ctypes.POINTER(i64), ctypes.c_char_p, ctypes.c_size_t])
    lib.onnx_perforate_build_gather_table.restype = i32
    return lib


def uniform_mask(h: int, w: int, rate: float, seed: int) -> np.ndarray:
    keep = max(1, int(round((1.0 - rate) * h * w)))
    mask = np.zeros(h * w, np.uint8)
    mask[np.random.default_rng(seed).choice(h * w, keep, replace=False)] = 1
    return mask.reshape(h, w)


def nearest_index(mask: np.ndarray) -> np.ndarray:
    ho, wo = mask.shape
    ys, xs = np.nonzero(mask)
    gy, gx = np.mgrid[0:ho, 0:wo]
    d = (gy.reshape(-1, 1) - ys.reshape(1, -1)) ** 2 + (gx.reshape(-1, 1) - xs.reshape(1, -1)) ** 2
    return np.argmin(d, axis=1).reshape(ho, wo)  # first minimum: smallest row-major index on ties


def gather_table(lib, h, w, mask) -> np.ndarray:
    """3x3, stride 1, pad 1 table from the library's shared geometry code."""
    mask = np.ascontiguousarray(mask, np.uint8)
    offsets = np.empty(9 * mask.size, np.int32)
    count = ctypes.c_int64(0)
    error = ctypes.create_string_buffer(512)
    if lib.onnx_perforate_build_gather_table(h, w, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, mask.ctypes.data, mask.shape[0],
                                             mask.shape[1], offsets.ctypes.data, ctypes.byref(count), error,
                                             len(error)):
        sys.exit(error.value.decode())
    return offsets[: 9 * count.value].reshape(9, count.value)


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
    parser.add_argument("--library", help=f"path of {KERNELS_NAME}")
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
    lib = load(find_library(args.library))
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 64])
    warmup, repeats = (5, 7) if args.quick else (20, 25)

    def check(status: int, what: str) -> None:
        if status:
            raise RuntimeError(f"{what}: {lib.onnx_perforate_cuda_error_string(status).decode()}")

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"library: {find_library(args.library)}")
    print()
    print("| layer (C, HxW -> M) | batch | r | cuDNN ms | ours ms | speedup | ideal 1/(1-r) | of ideal | max abs err (r=0) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
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
                mask = uniform_mask(hw, hw, rate, args.seed)
                table = torch.from_numpy(gather_table(lib, hw, hw, mask)).cuda()
                index = torch.from_numpy(nearest_index(mask).astype(np.int32)).cuda()
                count = table.shape[1]
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
                print(f"| {c}, {hw}x{hw} -> {m} | {n} | {rate:g} | {t_cudnn:.3f} | {t_ours:.3f} | {speedup:.2f}x | "
                      f"{ideal:.1f}x | {speedup / ideal:.0%} | {error} |", flush=True)
            del x, reference
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
