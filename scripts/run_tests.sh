#!/usr/bin/env bash
# Set-up and the whole test suite. The tests import the installed package (not the source tree), so
# they exercise the library exactly as users get it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export ONNX_PERFORATE_REQUIRE_LIBRARY=1  # a missing library fails the tests instead of skipping them
PYTHON="${PYTHON:-python3}"
# pytest exits 5 when it collected no test: set -e turns that into a failure too.
cd tests && "$PYTHON" -m pytest -q -p no:cacheprovider "$@" .
