#!/usr/bin/env bash
# FFCV, for tools/bench_build.py's comparison row, in its own venv (tools/ffcv-venv).
#
# FFCV ships only as source and builds against OpenCV and libturbojpeg
# (Debian: libopencv-dev libturbojpeg0-dev pkg-config). It lives apart from
# .venv because it pulls opencv-python and numba, which alexpipe does not use.
# torch (which `import ffcv` needs) is the same pin as alexpipe's; torchvision
# is not needed (the benchmark feeds FFCV a small Dataset of PIL images).
# Exits non-zero, with the reason on the last line, if FFCV cannot be had.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FFCV_VENV:-$ROOT/tools/ffcv-venv}
FFCV_VERSION=${FFCV_VERSION:-1.0.2}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if "$VENV/bin/python" -c 'import ffcv.writer' 2>/dev/null; then
    echo "FFCV already installed in $VENV"
    exit 0
fi

if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing libopencv-dev libturbojpeg0-dev pkg-config (apt-get) ..."
        apt-get update -qq >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            libopencv-dev libturbojpeg0-dev pkg-config >/dev/null 2>&1
    fi
    if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
        echo "FFCV needs OpenCV and libturbojpeg headers: apt-get install libopencv-dev libturbojpeg0-dev pkg-config" >&2
        exit 1
    fi
fi

# The interpreter .venv was made from (FFCV's wheel is built for it).
BASE_PYTHON=$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null || command -v python3)
rm -rf "$VENV"
"$BASE_PYTHON" -m venv "$VENV" || { echo "cannot create $VENV" >&2; exit 1; }
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip setuptools wheel \
    && "${PIP[@]}" numpy pillow "torch==$TORCH_VERSION" \
    && "${PIP[@]}" --no-build-isolation "ffcv==$FFCV_VERSION" \
    || { echo "pip could not install ffcv==$FFCV_VERSION into $VENV" >&2; exit 1; }
if ! "$VENV/bin/python" -c 'import ffcv.writer' ; then
    echo "ffcv installed but does not import" >&2
    exit 1
fi
echo "FFCV $FFCV_VERSION installed in $VENV"
