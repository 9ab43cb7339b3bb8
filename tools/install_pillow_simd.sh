#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD built for this CPU (AVX2 where available).
#
# Pillow-SIMD ships only as source; building it needs gcc and the libjpeg and
# zlib headers (Debian: build-essential libjpeg-dev zlib1g-dev). If the build
# fails we say so loudly and put plain Pillow back, never silently.
set -uo pipefail
PY=${1:-python3}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}

if "$PY" - <<'PY' 2>/dev/null; then
import importlib.metadata as m, sys
sys.exit(0 if m.version("pillow-simd") else 1)
PY
    echo "Pillow-SIMD already installed: $("$PY" -c 'import PIL; print(PIL.__version__)')"
    exit 0
fi

if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    cflags="-mavx2"
else
    cflags="-msse4.2"
fi
echo "Building Pillow-SIMD $VERSION with CC='cc $cflags' (about a minute)..."
"$PY" -m pip uninstall --quiet -y pillow >/dev/null 2>&1
if CC="cc $cflags" "$PY" -m pip install --quiet --no-deps --no-cache-dir \
        --no-binary pillow-simd "pillow-simd==$VERSION"; then
    "$PY" -c 'import PIL.Image, PIL.features; assert PIL.features.check("jpg")' \
        && echo "Pillow-SIMD $VERSION installed ($cflags)." && exit 0
    echo "Pillow-SIMD built but cannot decode JPEG; reverting." >&2
    "$PY" -m pip uninstall --quiet -y pillow-simd >/dev/null 2>&1
fi
cat >&2 <<'MSG'
################################################################################
# WARNING: Pillow-SIMD could not be built; falling back to plain Pillow.
# Install gcc and the image headers and run `make install` again:
#     sudo apt-get install build-essential libjpeg-dev zlib1g-dev
# alexpipe works with plain Pillow, but build-shards will be slower.
################################################################################
MSG
"$PY" -m pip install --quiet pillow
exit 0
