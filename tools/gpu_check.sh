#!/usr/bin/env bash
# GPU check for the online loaders, on a machine with a CUDA GPU and DALI:
#   1. the tests marked `gpu` (DALI GPU pipeline == DALI CPU pipeline, device memory flat);
#   2. `alexpipe bench-loader --device cuda` (and --device cpu for comparison) on shards;
#   3. training img/s with real data vs synthetic data (tools/bench_train.py), also with
#      bf16 + channels-last and with the two-column split.
# Usage: tools/gpu_check.sh [SHARDS_DIR]   (default: 2000 synthetic images built on the fly)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; nothing to check here")
print(f"GPU: {torch.cuda.get_device_name()}")
PY

echo "== gpu tests"
"$PYTHON" -m pytest -q -m gpu tests/test_loader.py

shards=${1:-}
if [ -z "$shards" ]; then
    shards=$(mktemp -d -t alexpipe-gpu-check-XXXXXX)
    trap 'rm -rf "$shards"' EXIT
    echo "== building 2000 synthetic images into $shards"
    "$PYTHON" -c "import sys; sys.path.insert(0, 'tools'); from pathlib import Path; \
from bench_loader import build_synthetic_shards; build_synthetic_shards(Path('$shards'), 2000)"
fi

echo "== bench-loader"
for device in cuda cpu; do
    "$PYTHON" -m alexpipe.cli bench-loader --shards "$shards" --backend dali --device "$device" \
        --batches 40 --json
done
"$PYTHON" -m alexpipe.cli bench-loader --shards "$shards" --backend dali --device cuda \
    --batches 100 --batch-size 256 --num-threads 8 --json

echo "== training: real data vs synthetic data (does the loader starve the GPU?)"
"$PYTHON" tools/bench_train.py --shards "$shards" --device cuda --backend dali --json
"$PYTHON" tools/bench_train.py --shards "$shards" --device cuda --backend dali --bf16 \
    --channels-last --json
"$PYTHON" tools/bench_train.py --shards "$shards" --device cuda --backend dali \
    --parallel columns --json
