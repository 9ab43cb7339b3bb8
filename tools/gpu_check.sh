#!/usr/bin/env bash
# GPU check, as one short script for a machine with a CUDA GPU:
#   1. the tests marked `gpu` (with DALI: DALI GPU pipeline == DALI CPU pipeline, device
#      memory flat; always: the trainer on CUDA with bf16/channels-last and columns);
#   2. with DALI: `alexpipe bench-loader --device cuda` (and --device cpu for comparison);
#   3. training img/s with real data vs synthetic data (tools/bench_train.py): the paper's
#      network, then bf16 + channels-last, then --parallel columns (both columns on one
#      device when there is one GPU). Real data come through DALI when it is installed,
#      else through the torch backend.
# Without DALI the PyTorch side still runs: it needs only torch, numpy and Pillow from
# the environment (plus pytest for step 1), with this checkout on PYTHONPATH.
#
# Usage: tools/gpu_check.sh [SHARDS_DIR]   (default: synthetic shards built on the fly)
# Environment:
#   PYTHON   the interpreter (default: .venv/bin/python if it exists, else python3)
#   DEVICE   cuda (default); DEVICE=cpu is a dry run of the same steps with a tiny
#            network and a few steps, to check the script on a machine without a GPU
#   STEPS    timed steps per measurement (default 50; 2 with DEVICE=cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}

case "$DEVICE" in
    cuda)
        images=2000 batch=128 width=1.0 steps=${STEPS:-50} threads=8
        "$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (DEVICE=cpu runs the dry run)")
print(f"GPU: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}")
PY
        ;;
    cpu)
        images=64 batch=8 width=0.0625 steps=${STEPS:-2} threads=1
        echo "gpu_check: DEVICE=cpu, a dry run (tiny network, $steps steps): no GPU figures"
        ;;
    *)
        echo "gpu_check: DEVICE must be cuda or cpu, not $DEVICE" >&2
        exit 2
        ;;
esac

if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then backend=dali; else backend=torch; fi
echo "== loader backend for real data: $backend"

echo "== gpu tests"
if [ "$DEVICE" = cpu ]; then
    echo "(skipped in the dry run: they need CUDA)"
elif ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    echo "(skipped: pytest is not installed)"
elif [ "$backend" = dali ]; then
    "$PYTHON" -m pytest -q -m gpu tests/test_loader.py tests/test_train.py
else
    "$PYTHON" -m pytest -q -m gpu tests/test_train.py
fi

shards=${1:-}
if [ -z "$shards" ]; then
    shards=$(mktemp -d -t alexpipe-gpu-check-XXXXXX)
    trap 'rm -rf "$shards"' EXIT
    echo "== building $images synthetic images into $shards"
    "$PYTHON" -c "import sys; sys.path.insert(0, 'tools'); from pathlib import Path; \
from bench_loader import build_synthetic_shards; build_synthetic_shards(Path('$shards'), $images)"
fi

echo "== bench-loader"
if [ "$backend" = dali ]; then
    for loader_device in "$DEVICE" cpu; do
        "$PYTHON" -m alexpipe.cli bench-loader --shards "$shards" --backend dali \
            --device "$loader_device" --batches 40 --json
    done
else
    echo "(skipped: DALI is not installed)"
fi

echo "== training: real data vs synthetic data (does the loader starve the GPU?)"
bench=("$PYTHON" tools/bench_train.py --shards "$shards" --device "$DEVICE" --backend "$backend"
    --batch-size "$batch" --width "$width" --steps "$steps" --num-threads "$threads" --json)
"${bench[@]}"
"${bench[@]}" --bf16 --channels-last
"${bench[@]}" --parallel columns
