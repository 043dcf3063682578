#!/usr/bin/env bash
# Set-up, then the main job on the bundled sample model and data: the greedy tuner perforates
# sample_models/fashion_cnn.onnx to a 1.5x speedup in ONNX Runtime (batch 32, one thread), calibrating
# on 500 of the bundled Fashion-MNIST test images and evaluating on the other 500, then recovers the
# accuracy by distillation from the original on the calibration images (--finetune). Prints the
# speed/accuracy trade-off table and the held-out numbers before and after recovery beside the model
# fed smaller images; the model, report.json and plots go to reports/fashion_cnn/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PYTHON="${PYTHON:-python3}"
repo="$PWD"
# Run from outside the source tree so the installed package (with its compiled library) is used.
cd /tmp && "$PYTHON" -m onnx_perforate tune "$repo/sample_models/fashion_cnn.onnx" \
  --data "$repo/sample_models/fashion_mnist_subset.npz" --subset-size 500 \
  --target-speedup 1.5 --batch 32 --threads 1 --finetune -o "$repo/reports/fashion_cnn" "$@"
