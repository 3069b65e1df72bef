#!/usr/bin/env bash
# Train the embedded digits demo model on CPU and copy it into the package.
# About 25-40 minutes on one shared CPU core; then check it with scripts/eval_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/digits}
starflow train --config starflow/configs/digits.yaml --data digits --out "$OUT" \
  --steps 1800 --batch-size 64 --lr 1e-3 --warmup 100 --threads 1 \
  --sample-every 200 --checkpoint-every 200
cp "$OUT/model.safetensors" starflow/assets/digits.safetensors
cp "$OUT/model.labels.safetensors" starflow/assets/digits.labels.safetensors
python scripts/eval_demo.py --grid docs/demo-grid.png
