"""Exact, mergeable pixel statistics of the train split: mean image, RGB mean/std, RGB PCA.

Each shard task adds its images to a :class:`PixelStats`; the build merges
the shards' partial results. Every sum is an integer sum of uint8 values, so
adding and merging are exact: the result does not depend on how images are
spread over tasks or in which order partial results are merged (bit-equal,
not just close). Floats only appear in :meth:`PixelStats.finalize`.

Sums while a shard adds images are as narrow as they can be exactly, since
adding is on every image's path (see :meth:`PixelStats.add`); merged sums
are int64. Overflow bound of int64: the largest sum is the 3×3 sum of outer
products, at most 255² per pixel, so int64 (9.2e18) holds 1.4e14 pixels: 2.1
billion 256×256 images, 1700 times ImageNet's 1.28 million.
"""

from __future__ import annotations

import io

import numpy as np

STATS_FORMAT = 1
# A shard's per-pixel sums are uint32: each grows by at most 255 an image, so
# uint32 holds it for 16,843,009 images, far more than a shard (1000 by
# default). A PixelStats that gets more switches to uint64 (in add).
MAX_UINT32_IMAGES = (2**32 - 1) // 255
# The six distinct products of an image's channel pairs (RR, GG, BB, RG, RB,
# GB), in the order pixel_kernel sums them: index pairs into outer_sum.
_PRODUCT_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


class PixelStats:
    """Sums over the images added so far: counts, per-channel sums, 3×3 sums of
    outer products of RGB vectors, and a per-pixel sum image (size×size×3)."""

    def __init__(self, size: int = 256):
        self.size = int(size)
        self.num_images = 0
        self.num_pixels = 0
        self._pixel_sums = np.zeros(self.size * self.size * 3, np.uint32)  # flat, interleaved
        # uint64: at most 255² = 65025 per pixel, exact for 2.8e14 pixels
        # (4.3 billion 256×256 images); merged sums are int64 (outer_sum).
        self._product_sums = np.zeros(len(_PRODUCT_PAIRS), np.uint64)

    def add(self, pixels: np.ndarray) -> None:
        """Add one uint8 size×size×3 RGB image (as stored in the shard).

        One pass over the bytes in ``pixel_kernel`` (compiled; see there why);
        a C-contiguous array (``np.asarray`` of a Pillow image) is used as it is.
        """
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape != (self.size, self.size, 3):
            expected = f"uint8 {self.size}x{self.size}x3"
            raise ValueError(f"expected {expected} pixels, got {pixels.dtype} {pixels.shape}")
        from pipeline.build.pixel_kernel import add_interleaved

        dtype = self._pixel_sums.dtype
        if dtype == np.int64 or (dtype == np.uint32 and self.num_images >= MAX_UINT32_IMAGES):
            # more images after a merge or load (int64), or past uint32's bound:
            # the kernel adds unsigned integers, so uint64 (exact up to 7e16 images)
            self._pixel_sums = self._pixel_sums.astype(np.uint64)
        flat = np.ascontiguousarray(pixels).reshape(-1)
        add_interleaved(flat, self._pixel_sums, self._product_sums)
        self.num_images += 1
        self.num_pixels += self.size * self.size

    @property
    def pixel_sum(self) -> np.ndarray:
        """Per-pixel sums, int64 size×size×3."""
        return self._pixel_sums.astype(np.int64).reshape(self.size, self.size, 3)

    @property
    def outer_sum(self) -> np.ndarray:
        """Sums of the outer products of the pixels' RGB vectors, int64 3×3."""
        outer = np.zeros((3, 3), np.int64)
        for (row, column), total in zip(_PRODUCT_PAIRS, self._product_sums, strict=True):
            outer[row, column] = outer[column, row] = int(total)
        return outer

    @property
    def channel_sum(self) -> np.ndarray:
        """Per-channel sums over all pixels, derived from the per-pixel sums.

        Derived rather than accumulated: nothing more to do per image in :meth:`add`.
        """
        return self._pixel_sums.reshape(-1, 3).sum(axis=0, dtype=np.int64)

    def _set(self, num_images: int, num_pixels: int, outer_sum, pixel_sum) -> PixelStats:
        """Replace the sums (merge, load): outer_sum 3×3, pixel_sum size×size×3; int64."""
        self.num_images = int(num_images)
        self.num_pixels = int(num_pixels)
        outer_sum = np.asarray(outer_sum, np.int64)
        self._product_sums = np.array([outer_sum[pair] for pair in _PRODUCT_PAIRS], np.uint64)
        self._pixel_sums = np.array(pixel_sum, np.int64).reshape(-1)
        return self

    def merge(self, other: PixelStats) -> PixelStats:
        """A new PixelStats holding both operands' sums, in int64 (operands unchanged)."""
        if other.size != self.size:
            raise ValueError(f"cannot merge statistics of size {self.size} and {other.size}")
        return PixelStats(self.size)._set(
            self.num_images + other.num_images,
            self.num_pixels + other.num_pixels,
            self.outer_sum + other.outer_sum,
            self.pixel_sum + other.pixel_sum,
        )

    def save(self, handle) -> None:
        """Write to a binary file object (callers make it atomic, e.g. ``atomic_file``)."""
        np.savez(
            handle,
            format=np.int64(STATS_FORMAT),
            size=np.int64(self.size),
            num_images=np.int64(self.num_images),
            num_pixels=np.int64(self.num_pixels),
            outer_sum=self.outer_sum,
            pixel_sum=self.pixel_sum,
        )

    @classmethod
    def load(cls, source) -> PixelStats:
        """Read what :meth:`save` wrote (a path or a binary file object)."""
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        with np.load(source) as arrays:
            if int(arrays["format"]) != STATS_FORMAT:
                raise ValueError(f"unknown pixel statistics format {int(arrays['format'])}")
            return cls(int(arrays["size"]))._set(
                arrays["num_images"], arrays["num_pixels"], arrays["outer_sum"], arrays["pixel_sum"]
            )

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, PixelStats)
            and self.size == other.size
            and self.num_images == other.num_images
            and self.num_pixels == other.num_pixels
            and np.array_equal(self.outer_sum, other.outer_sum)
            and np.array_equal(self.pixel_sum, other.pixel_sum)
        )

    __hash__ = None  # mutable

    def finalize(self) -> tuple[dict, np.ndarray]:
        """``stats.json``'s contents (docs/format.md) and the float32 mean image (0..255).

        The covariance is the population covariance of all pixels' RGB
        vectors, computed from the integer sums with exact integer arithmetic
        up to one final division, so it has no cancellation error. Its
        eigenvectors are the columns of ``eigvecs`` (eigenvalues descending),
        each with its largest-magnitude component made positive, because an
        eigenvector's sign is otherwise arbitrary and would differ between
        LAPACK builds.
        """
        if self.num_images == 0:
            raise ValueError("no images were added: statistics are undefined")
        count = self.num_pixels
        sums = [int(value) for value in self.channel_sum]
        covariance = np.empty((3, 3), np.float64)
        for row in range(3):
            for column in range(3):
                numerator = count * int(self.outer_sum[row, column]) - sums[row] * sums[column]
                covariance[row, column] = numerator / (count * count)  # Python ints: exact
        mean_rgb = [value / count for value in sums]
        eigvals, eigvecs = np.linalg.eigh(covariance)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = eigvals[order], eigvecs[:, order]
        for column in range(3):
            if eigvecs[np.argmax(np.abs(eigvecs[:, column])), column] < 0:
                eigvecs[:, column] = -eigvecs[:, column]
        stats = {
            "num_images": self.num_images,
            "num_pixels": count,
            "mean_rgb": mean_rgb,
            "std_rgb": [float(np.sqrt(max(covariance[k, k], 0.0))) for k in range(3)],
            "cov_rgb": covariance.tolist(),
            "eigvals": [float(value) for value in eigvals],
            "eigvecs": eigvecs.tolist(),
            "scale": "0-255",
        }
        mean_image = (self.pixel_sum / self.num_images).astype(np.float32)
        return stats, mean_image


def mean_png_bytes(mean_image: np.ndarray) -> bytes:
    """The mean image as an 8-bit RGB PNG, for people to look at."""
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(mean_image, np.float64)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
