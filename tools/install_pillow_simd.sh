#!/usr/bin/env bash
# Make Pillow-SIMD, built for this CPU (AVX2 where available), the active PIL.
#
# Pillow-SIMD ships only as source; building it needs gcc and the libjpeg and
# zlib headers (Debian: build-essential libjpeg-dev zlib1g-dev). The built
# wheel is kept in .venv/wheels, because every later `pip install -e .` puts
# plain Pillow back (matplotlib asks for "pillow", which pillow-simd does not
# satisfy by name) and this script then only has to reinstall the wheel.
# If the build fails we say so loudly and keep plain Pillow, never silently.
set -uo pipefail
PY=${1:-python3}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
WHEELS=$("$PY" -c 'import sys; print(sys.prefix)')/wheels

active_is_simd() {
    "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as metadata, sys
import PIL
try:
    simd = metadata.version("pillow-simd")
except metadata.PackageNotFoundError:
    sys.exit(1)
try:
    metadata.version("pillow")
    sys.exit(1)  # plain Pillow installed over it
except metadata.PackageNotFoundError:
    pass
sys.exit(0 if PIL.__version__ == simd.split(".post")[0] or PIL.__version__ == simd else 1)
PY
}

if active_is_simd; then
    echo "Pillow-SIMD active: $("$PY" -c 'import PIL; print(PIL.__version__)')"
    exit 0
fi

if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    cflags="-mavx2"
else
    cflags="-msse4.2"
fi
mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/pillow_simd-"$VERSION"-*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
    echo "Building Pillow-SIMD $VERSION with CC='cc $cflags' (about a minute)..."
    CC="cc $cflags" "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary pillow-simd "pillow-simd==$VERSION" -w "$WHEELS"
    wheel=$(ls "$WHEELS"/pillow_simd-"$VERSION"-*.whl 2>/dev/null | head -n 1)
fi
if [ -n "$wheel" ]; then
    "$PY" -m pip uninstall --quiet -y pillow pillow-simd >/dev/null 2>&1
    if "$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel" \
        && "$PY" -c 'import PIL.Image, PIL.features; assert PIL.features.check("jpg")'; then
        echo "Pillow-SIMD $VERSION active ($cflags)."
        exit 0
    fi
    echo "Pillow-SIMD did not install or cannot decode JPEG; reverting." >&2
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
