#!/usr/bin/env bash
# Installs onnx-perforate and its test dependencies on a fresh machine: builds the custom-op library
# (CMake via scikit-build-core; the ONNX Runtime headers are fetched by scripts/fetch_ort_headers.sh
# when no other copy is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check ".[test]"
# Checked from outside the source tree, which would shadow the installed package.
(cd / && "$PYTHON" -c "import onnx_perforate as p; print('onnx_perforate', p.__version__, 'library:', p.library_path())")
