"""The per-image loop of ``PixelStats.add``, compiled with numba.

Own code with a measured reason: adding one 256×256 image (per-pixel sums
plus the six channel products, all exact) is on every train image's path.
In numpy it takes a widening pass, six product arrays and six widening
reductions, ~0.1 ms an image at best (tools/bench_build.py); this one pass
over the interleaved bytes, which LLVM vectorizes, takes about a third of
that. Imported on first use only (``PixelStats.add``), so the processes that
merely merge or read statistics do not pay numba's import.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, boundscheck=False)
def add_interleaved(pixels, pixel_sums, product_sums):  # pragma: no cover - compiled
    """Add one image, ``pixels`` its RGB bytes flat (R, G, B, R, ...).

    ``pixel_sums`` (same length; uint32 or uint64) gets each byte added;
    ``product_sums`` (uint64, 6) gets the sums of R·R, G·G, B·B, R·G, R·B,
    G·B. The products are summed in uint64, exact for any image below
    2.8e14 pixels; the caller keeps ``pixel_sums`` wide enough.
    """
    rr = gg = bb = rg = rb = gb = np.uint64(0)
    for pixel in range(pixels.size // 3):
        index = 3 * pixel
        red = np.uint64(pixels[index])
        green = np.uint64(pixels[index + 1])
        blue = np.uint64(pixels[index + 2])
        pixel_sums[index] += red
        pixel_sums[index + 1] += green
        pixel_sums[index + 2] += blue
        rr += red * red
        gg += green * green
        bb += blue * blue
        rg += red * green
        rb += red * blue
        gb += green * blue
    product_sums[0] += rr
    product_sums[1] += gg
    product_sums[2] += bb
    product_sums[3] += rg
    product_sums[4] += rb
    product_sums[5] += gb
