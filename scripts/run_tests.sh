#!/usr/bin/env bash
# Set-up and the whole test suite. The tests import the installed package (not the source tree), so
# they exercise the library exactly as users get it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export ONNX_PERFORATE_REQUIRE_LIBRARY=1  # a missing library fails the tests instead of skipping them
PYTHON="${PYTHON:-python3}"
# pytest exits 5 when it collected no test: set -e turns that into a failure too.
(cd tests && "$PYTHON" -m pytest -q -p no:cacheprovider "$@" .)
# The whole suite (no pytest arguments) also runs the op tests on an ASan + UBSan build of the library.
if [ "$#" -eq 0 ] && [ "${ONNX_PERFORATE_SKIP_SANITIZERS:-0}" != 1 ]; then
  PYTHON="$PYTHON" bash scripts/sanitize_tests.sh
fi
