#!/usr/bin/env bash
# The op tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU custom-op
# library (CMake option ONNX_PERFORATE_SANITIZE, built in build/sanitize). Any out-of-bounds access,
# use after free or undefined behaviour in the kernels aborts the test process and fails this script,
# with the sanitizer's report printed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
BUILD=build/sanitize
cmake -S custom_ops -B "$BUILD" -DONNX_PERFORATE_SANITIZE=ON -DONNX_PERFORATE_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$BUILD" -j2 >/dev/null
REPORTS="$PWD/$BUILD/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
# The sanitizer runtimes must be loaded first: Python itself is not instrumented. Leak checking is off
# (the interpreter keeps memory to its end); reports go to files, since pytest captures stderr.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan"
export ONNX_PERFORATE_LIBRARY="$PWD/$BUILD/libonnx_perforate_ops.so"
export ONNX_PERFORATE_REQUIRE_LIBRARY=1
status=0
(cd tests && "$PYTHON" -m pytest -q -p no:cacheprovider "$@" test_ops.py test_kernel_guards.py test_compact_pool.py test_quantized_ops.py) || status=$?
if compgen -G "$REPORTS/*" >/dev/null; then
  echo "sanitizer reports:" >&2
  cat "$REPORTS"/* >&2
  status=1
fi
exit "$status"
