"""PixelStats: exact, mergeable, and equal to an independent float64 computation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.build.stats import MAX_UINT32_IMAGES, PixelStats, mean_png_bytes
from shards.atomic import atomic_file

SIZE = 16


def random_images(count: int, size: int = SIZE, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Correlated channels, so the covariance has a clear principal axis.
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, (size, size, 1))
        noise = rng.integers(-40, 41, (size, size, 3)) * np.array([1, 2, 3])
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def stats_of(images, size: int = SIZE) -> PixelStats:
    stats = PixelStats(size)
    for image in images:
        stats.add(image)
    return stats


def test_matches_independent_float64_computation():
    images = random_images(9)
    stats, mean_image = stats_of(images).finalize()
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.float64)
    covariance = np.cov(pixels, rowvar=False, bias=True)  # population covariance
    assert stats["num_images"] == 9 and stats["num_pixels"] == 9 * SIZE * SIZE
    np.testing.assert_allclose(stats["mean_rgb"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std_rgb"], pixels.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["cov_rgb"], covariance, rtol=1e-10)
    np.testing.assert_allclose(stats["eigvals"], np.linalg.eigvalsh(covariance)[::-1], rtol=1e-10)
    assert mean_image.dtype == np.float32 and mean_image.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(mean_image, np.mean(images, axis=0), rtol=1e-6)
    assert stats["scale"] == "0-255"
    json.dumps(stats)  # plain Python numbers only


def test_eigenvectors_are_orthonormal_sorted_and_sign_fixed():
    stats, _ = stats_of(random_images(5)).finalize()
    covariance = np.array(stats["cov_rgb"])
    eigvals = np.array(stats["eigvals"])
    eigvecs = np.array(stats["eigvecs"])
    assert list(eigvals) == sorted(eigvals, reverse=True)
    np.testing.assert_allclose(eigvecs.T @ eigvecs, np.eye(3), atol=1e-12)
    for k in range(3):  # column k belongs to eigvals[k]
        np.testing.assert_allclose(
            covariance @ eigvecs[:, k], eigvals[k] * eigvecs[:, k], atol=1e-9 * eigvals[0]
        )
        assert eigvecs[np.argmax(np.abs(eigvecs[:, k])), k] > 0


def test_merge_is_exact_in_any_grouping_and_order():
    images = random_images(12, seed=3)
    whole = stats_of(images)
    parts = [stats_of(images[start : start + 4]) for start in (0, 4, 8)]
    left_first = parts[0].merge(parts[1]).merge(parts[2])
    right_first = parts[0].merge(parts[1].merge(parts[2]))
    reversed_order = parts[2].merge(parts[0]).merge(parts[1])
    assert whole == left_first == right_first == reversed_order
    results = [json.dumps(s.finalize()[0]) for s in (whole, left_first, right_first)]
    assert results[0] == results[1] == results[2]
    # merge leaves its operands alone
    assert parts[0] == stats_of(images[:4])


def test_constant_images_have_exactly_zero_variance():
    stats, mean_image = stats_of([np.full((SIZE, SIZE, 3), 255, np.uint8)] * 7).finalize()
    assert stats["mean_rgb"] == [255.0, 255.0, 255.0]
    assert stats["std_rgb"] == [0.0, 0.0, 0.0]
    assert stats["cov_rgb"] == [[0.0] * 3] * 3
    assert np.all(mean_image == 255.0)


def test_save_and_load_round_trip(tmp_path):
    stats = stats_of(random_images(3))
    path = tmp_path / "part.stats.npz"
    with atomic_file(path) as handle:
        stats.save(handle)
    assert PixelStats.load(path) == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.stats.npz"]  # no temp left
    buffer = io.BytesIO()
    stats.save(buffer)
    assert PixelStats.load(io.BytesIO(buffer.getvalue())) == stats


def test_add_checks_shape_and_dtype():
    stats = PixelStats(SIZE)
    with pytest.raises(ValueError):
        stats.add(np.zeros((SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError):
        stats.add(np.zeros((SIZE + 1, SIZE, 3), np.uint8))
    with pytest.raises(ValueError):
        stats.finalize()
    with pytest.raises(ValueError):
        stats.merge(PixelStats(SIZE * 2))


def test_full_size_images_and_mean_png():
    images = random_images(2, size=256, seed=7)
    stats, mean_image = stats_of(images, size=256).finalize()
    assert mean_image.shape == (256, 256, 3)
    with Image.open(io.BytesIO(mean_png_bytes(mean_image))) as png:
        assert png.mode == "RGB" and png.size == (256, 256)
        decoded = np.asarray(png).astype(np.float64)
    assert np.abs(decoded - mean_image).max() <= 0.5


def reference_sums(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Outer-product and per-pixel sums computed independently, in int64."""
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.int64)
    return pixels.T @ pixels, np.sum([image.astype(np.int64) for image in images], axis=0)


def extreme_images(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    checkerboard = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return [
        np.zeros((size, size, 3), np.uint8),
        np.full((size, size, 3), 255, np.uint8),
        np.repeat(checkerboard[:, :, None], 3, axis=2),
        np.stack([checkerboard, 255 - checkerboard, checkerboard], axis=2),
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        rng.integers(250, 256, (size, size, 3), dtype=np.uint8),
    ]


@pytest.mark.parametrize("size", [256, 37, 300])
def test_sums_equal_an_int64_reference_on_extreme_and_random_images(size):
    images = extreme_images(size) * 3
    stats = stats_of(images, size)
    outer, per_pixel = reference_sums(images)
    assert stats.outer_sum.dtype == np.int64 and np.array_equal(stats.outer_sum, outer)
    assert stats.pixel_sum.dtype == np.int64 and np.array_equal(stats.pixel_sum, per_pixel)
    assert np.array_equal(stats.channel_sum, per_pixel.sum(axis=(0, 1)))
    assert stats.num_images == len(images) and stats.num_pixels == len(images) * size * size


def test_any_memory_layout_gives_the_same_sums():
    images = random_images(4, size=64, seed=5)
    planar = [np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -1, 0)), 0, -1) for x in images]
    padded = [np.concatenate([x, np.zeros_like(x[..., :1])], axis=2)[..., :3] for x in images]
    flipped = [np.ascontiguousarray(x[::-1])[::-1] for x in images]
    reference = stats_of(images, 64)
    for variant in (planar, padded, flipped):
        assert not variant[0].flags.c_contiguous
        assert stats_of(variant, 64) == reference


def test_a_shards_pixel_sums_are_uint32_until_they_could_overflow():
    # 255 per image: uint32 holds exactly MAX_UINT32_IMAGES of them (2**32 - 1 = 255 * 16843009)
    assert MAX_UINT32_IMAGES == 16_843_009 and 255 * MAX_UINT32_IMAGES == 2**32 - 1
    white = np.full((SIZE, SIZE, 3), 255, np.uint8)
    stats = PixelStats(SIZE)
    stats.add(white)
    assert stats._pixel_sums.dtype == np.uint32
    # as if MAX_UINT32_IMAGES - 1 white images had been added already
    stats.num_images = MAX_UINT32_IMAGES - 1
    stats._pixel_sums[:] = 255 * (MAX_UINT32_IMAGES - 1)
    stats.add(white)  # the last image uint32 holds
    assert stats._pixel_sums.dtype == np.uint32
    assert np.all(stats.pixel_sum == 2**32 - 1)
    stats.add(white)  # one more: widened first, nothing wraps
    assert stats._pixel_sums.dtype == np.uint64
    assert np.all(stats.pixel_sum == 255 * (MAX_UINT32_IMAGES + 1))


def test_merged_sums_are_int64_and_more_images_can_be_added():
    images = random_images(6, seed=9)
    merged = stats_of(images[:2]).merge(stats_of(images[2:4]))
    assert merged._pixel_sums.dtype == np.int64
    assert merged.outer_sum.dtype == np.int64 and merged.pixel_sum.dtype == np.int64
    for image in images[4:]:
        merged.add(image)
    assert merged == stats_of(images)
    loaded = io.BytesIO()
    stats_of(images[:3]).save(loaded)
    resumed = PixelStats.load(loaded.getvalue())
    for image in images[3:]:
        resumed.add(image)
    assert resumed == stats_of(images)
