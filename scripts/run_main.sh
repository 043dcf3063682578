#!/usr/bin/env bash
# Set-up and the main job on the bundled sample model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PYTHON="${PYTHON:-python3}"
cd /tmp && "$PYTHON" "$OLDPWD/benchmarks/bench_kernels.py" --quick "$@"
