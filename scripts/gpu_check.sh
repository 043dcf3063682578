#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU, nvcc, CMake, PyTorch with CUDA, numpy,
# onnx, onnxruntime (the CPU build is enough) and pytest; no network, no pip install, and neither
# onnx-graphsurgeon nor onnx-ad needed. In order, each step logged to OUT_DIR (default: gpu-check/):
#   1. environment.txt  nvidia-smi, nvcc, the Python packages; stops early when the driver is older than
#                       the toolkit (a static CUDA 13 runtime needs driver >= 580; build with a CUDA 12.x
#                       toolkit for older drivers: CUDACXX=/usr/local/cuda-12.x/bin/nvcc)
#   2. build.log        CMake build of the CUDA kernels library (plus the ORT custom-op libraries when ORT
#                       headers are found: ONNXRUNTIME_INCLUDE_DIR, or the repository's .ort-headers/)
#   3. tests.log/.xml   tests/test_cuda_kernels.py (kernels against PyTorch's conv2d; the ORT CUDA EP tests
#                       skip, saying why, with a CPU-only onnxruntime) and tests/test_package_imports.py
#   4. bench.md         benchmarks/bench_cuda.py: cuDNN vs our kernels at batch 1, 8 and 64
#   summary.md          each step's status and time
# Within 10 minutes on an H200 (each step has a time limit; a step that runs out is reported, not hung).
#
#   bash scripts/gpu_check.sh [--quick] [OUT_DIR]      --quick: fewer benchmark repeats
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
quick=0
out=""
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *)
      if [[ -n "$out" ]]; then echo "gpu_check: one output folder only (got $out and $arg)" >&2; exit 2; fi
      out="$arg" ;;
  esac
done
out="${out:-gpu-check}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
PYTHON="${PYTHON:-python3}"
build="build/gpu-check"
summary="$out/summary.md"
: > "$summary"
report() { echo "$*" | tee -a "$summary"; }
started=$SECONDS
status=0

# A step: name, time limit (s), log file, command... Its output goes to the log and to the terminal, except
# for the build's (its tail is shown when it fails).
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS rc
  if [[ "$name" == build ]]; then
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    (( rc == 0 )) || tail -n 40 "$log"
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    report "- $name: TIMED OUT after ${limit}s (log: $(basename "$log"))"
  else
    report "- $name: exit $rc in $((SECONDS - t0))s (log: $(basename "$log"))"
  fi
  return $rc
}

# --- 1. environment and driver --------------------------------------------------------------------------
env_log="$out/environment.txt"
{
  echo "date: $(date -u)"
  echo "host: $(uname -a)"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
} > "$env_log"
report "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
if ! command -v nvidia-smi > /dev/null; then
  report "- no nvidia-smi: this machine has no NVIDIA driver"
  exit 3
fi
# The compiler CMake will use: CUDACXX, else nvcc on PATH, else the newest /usr/local/cuda*/bin/nvcc.
nvcc="${CUDACXX:-$(command -v nvcc || ls -d /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V | tail -1)}"
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  report "- no nvcc found (set CUDACXX or put nvcc on PATH)"
  exit 3
fi
nvcc_version=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\.[0-9]*\).*/\1/p' | head -1)
driver=$(nvidia-smi --query-gpu=driver_version,name --format=csv,noheader 2>/dev/null | head -1)
{ echo; echo "nvcc: $nvcc ($nvcc_version)"; "$nvcc" --version; echo; cmake --version | head -1; } >> "$env_log" 2>&1
"$PYTHON" - >> "$env_log" 2>&1 <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ["numpy", "onnx", "onnxruntime", "torch", "cupy", "pytest", "onnx_graphsurgeon", "onnx_ad"]:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # noqa: BLE001  missing packages are reported, not fatal here
        print(name, "MISSING:", type(error).__name__, error)
try:
    import torch
    print("torch CUDA", torch.version.cuda, "available:", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    import onnxruntime
    print("onnxruntime providers:", onnxruntime.get_available_providers())
except Exception as error:  # noqa: BLE001
    print("probe failed:", error)
EOF
report "- GPU: ${driver:-?}; driver CUDA ${driver_cuda:-?}; nvcc ${nvcc_version:-?} ($nvcc)"
if [[ -z "$driver_cuda" || -z "$nvcc_version" ]]; then
  report "- could not read the driver's CUDA version or nvcc's release (see environment.txt)"
  exit 3
fi
if (( ${driver_cuda%%.*} < ${nvcc_version%%.*} )); then
  report "- STOP: the driver supports CUDA $driver_cuda but nvcc is $nvcc_version. A CUDA ${nvcc_version%%.*} runtime" \
         "(linked statically into the libraries) does not run on this driver: CUDA 13 needs driver >= 580." \
         "Build with a toolkit of CUDA ${driver_cuda%%.*}.x or older (CUDACXX=/usr/local/cuda-${driver_cuda%%.*}.x/bin/nvcc)."
  exit 3
fi
if [[ "$driver_cuda" != "$nvcc_version" ]] && (( ${driver_cuda%%.*} == ${nvcc_version%%.*} )) &&
   [[ "$(printf '%s\n' "$driver_cuda" "$nvcc_version" | sort -V | head -1)" == "$driver_cuda" ]]; then
  report "- note: driver CUDA $driver_cuda < nvcc $nvcc_version (same major: minor-version compatibility; PTX for newer GPUs may not JIT)"
fi

# --- 2. build ---------------------------------------------------------------------------------------------
# ORT_OPS=AUTO: the ORT custom-op libraries only when headers are found (no fetch: there is no network).
step "build" 300 "$out/build.log" bash -c "
  cmake -S custom_ops -B '$build' -DONNX_PERFORATE_CUDA=ON -DONNX_PERFORATE_ORT_OPS=AUTO \
        -DCMAKE_CUDA_COMPILER='$nvcc' -DCMAKE_BUILD_TYPE=Release &&
  cmake --build '$build' -j \"\$(nproc)\"" || { report "- build failed: nothing else runs"; exit 1; }
export ONNX_PERFORATE_CUDA_KERNELS="$PWD/$build/cuda/libonnx_perforate_cuda_kernels.so"
for lib in "$build/libonnx_perforate_ops.so:ONNX_PERFORATE_LIBRARY" \
           "$build/cuda/libonnx_perforate_ops_cuda.so:ONNX_PERFORATE_CUDA_LIBRARY"; do
  if [[ -f "${lib%%:*}" ]]; then export "${lib##*:}=$PWD/${lib%%:*}"; fi
done
report "- built: $(cd "$build" && ls *.so cuda/*.so 2>/dev/null | tr '\n' ' ')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# --- 3. tests ---------------------------------------------------------------------------------------------
(cd tests && step "tests" 240 "$out/tests.log" "$PYTHON" -m pytest test_cuda_kernels.py test_package_imports.py \
   -v -rs -p no:cacheprovider --junitxml="$out/tests.xml") || status=1

# --- 4. benchmark against cuDNN ---------------------------------------------------------------------------
bench_args=(--batches 1 8 64)
if (( quick )); then bench_args+=(--quick); fi
step "benchmark" 240 "$out/bench.md" "$PYTHON" benchmarks/bench_cuda.py "${bench_args[@]}" || status=1

report "- total: $((SECONDS - started))s; logs in $out/"
exit "$status"
