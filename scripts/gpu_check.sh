#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU, nvcc, CMake and PyTorch with CUDA:
# builds the libraries with CMake (no pip needed), runs the CUDA tests (kernels against PyTorch's
# conv2d; the ORT CUDA EP tests run when onnxruntime-gpu is installed, and skip with the reason
# otherwise), then the benchmark against cuDNN. Logs go to OUT_DIR (default: gpu-check/).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--quick]
# ONNX Runtime headers: ONNXRUNTIME_INCLUDE_DIR, else scripts/fetch_ort_headers.sh's cache.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
quick="${2:-}"
mkdir -p "$out"
PYTHON="${PYTHON:-python3}"
build=build/gpu-check
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
{ cmake -S custom_ops -B "$build" -DONNX_PERFORATE_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
  cmake --build "$build" -j "$(nproc)"; } > "$out/build.log" 2>&1 || { echo "build failed, see $out/build.log"; exit 1; }
export ONNX_PERFORATE_LIBRARY="$PWD/$build/libonnx_perforate_ops.so"
export ONNX_PERFORATE_CUDA_LIBRARY="$PWD/$build/cuda/libonnx_perforate_ops_cuda.so"
export ONNX_PERFORATE_CUDA_KERNELS="$PWD/$build/cuda/libonnx_perforate_cuda_kernels.so"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
(cd tests && "$PYTHON" -m pytest test_cuda_kernels.py -v -rs -p no:cacheprovider) 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
"$PYTHON" benchmarks/bench_cuda.py $quick 2>&1 | tee "$out/bench.md"
echo "tests exit $tests; logs in $out/"
exit "$tests"
