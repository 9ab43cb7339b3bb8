"""PixelStats: exact, mergeable, and equal to an independent float64 computation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.build.stats import PixelStats, mean_png_bytes
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
