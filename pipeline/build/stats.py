"""Exact, mergeable pixel statistics of the train split: mean image, RGB mean/std, RGB PCA.

Each shard task adds its images to a :class:`PixelStats`; the build merges
the shards' partial results. Every sum is an int64 of uint8 values, so adding
and merging are exact: the result does not depend on how images are spread
over tasks or in which order partial results are merged (bit-equal, not
just close). Floats only appear in :meth:`PixelStats.finalize`.

Overflow bound: the largest sum is the 3×3 sum of outer products, at most
255² per pixel, so int64 (9.2e18) holds 1.4e14 pixels: 2.1 billion 256×256
images, 1700 times ImageNet's 1.28 million.
"""

from __future__ import annotations

import io

import numpy as np

STATS_FORMAT = 1


class PixelStats:
    """Sums over the images added so far: counts, per-channel sums, 3×3 sums of
    outer products of RGB vectors, and a per-pixel sum image (size×size×3)."""

    def __init__(self, size: int = 256):
        self.size = int(size)
        self.num_images = 0
        self.num_pixels = 0
        self.outer_sum = np.zeros((3, 3), np.int64)
        self.pixel_sum = np.zeros((self.size, self.size, 3), np.int64)

    def add(self, pixels: np.ndarray) -> None:
        """Add one uint8 size×size×3 RGB image (as stored in the shard)."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape != (self.size, self.size, 3):
            expected = f"uint8 {self.size}x{self.size}x3"
            raise ValueError(f"expected {expected} pixels, got {pixels.dtype} {pixels.shape}")
        # Channel planes, then the six distinct products as uint16 (255**2 =
        # 65025 fits) summed into uint64: exact, single-threaded, and several
        # times faster than a float64 BLAS product, which also spins up
        # threads that fight the other workers for cores.
        planes = np.ascontiguousarray(pixels.reshape(-1, 3).T)
        for row in range(3):
            for column in range(row, 3):
                products = np.multiply(planes[row], planes[column], dtype=np.uint16)
                total = int(products.sum(dtype=np.uint64))
                self.outer_sum[row, column] += total
                if column != row:
                    self.outer_sum[column, row] += total
        np.add(self.pixel_sum, pixels, out=self.pixel_sum)
        self.num_images += 1
        self.num_pixels += planes.shape[1]

    @property
    def channel_sum(self) -> np.ndarray:
        """Per-channel sums over all pixels, derived from the per-pixel sums.

        Derived rather than accumulated: a strided per-image channel sum
        costs more than the rest of :meth:`add` together.
        """
        return self.pixel_sum.sum(axis=(0, 1), dtype=np.int64)

    def merge(self, other: PixelStats) -> PixelStats:
        """A new PixelStats holding both operands' sums (operands unchanged)."""
        if other.size != self.size:
            raise ValueError(f"cannot merge statistics of size {self.size} and {other.size}")
        merged = PixelStats(self.size)
        merged.num_images = self.num_images + other.num_images
        merged.num_pixels = self.num_pixels + other.num_pixels
        merged.outer_sum = self.outer_sum + other.outer_sum
        merged.pixel_sum = self.pixel_sum + other.pixel_sum
        return merged

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
            stats = cls(int(arrays["size"]))
            stats.num_images = int(arrays["num_images"])
            stats.num_pixels = int(arrays["num_pixels"])
            stats.outer_sum = arrays["outer_sum"].astype(np.int64)
            stats.pixel_sum = arrays["pixel_sum"].astype(np.int64)
        return stats

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
        """``stats.json``'s contents (SPEC §4) and the float32 mean image (0..255).

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
