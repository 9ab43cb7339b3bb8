"""The shared augmentation description and its numpy reference (no files, no DALI)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.load.augment import (
    AugmentDraws,
    AugmentSpec,
    Normalize,
    channel_shift,
    crop_and_flip,
    denormalize,
    draw_augmentation,
    lighting_offsets,
    spec_from_stats,
    ten_crop_geometry,
    train_reference,
    val_reference,
)

EIGVECS = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
STATS = {
    "eigvals": [4000.0, 300.0, 20.0],
    "eigvecs": EIGVECS.tolist(),
    "mean_rgb": [120.0, 110.0, 100.0],
    "std_rgb": [60.0, 55.0, 50.0],
}


def make_spec(normalize="paper", lighting_std=0.1):
    mean_image = np.random.default_rng(1).uniform(0, 255, (256, 256, 3)).astype(np.float32)
    return spec_from_stats(STATS, mean_image, normalize, lighting_std), mean_image


def recover_alphas(offsets: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """Invert :func:`lighting_offsets`: project [N, 3] offsets on the eigenvectors, × 255/eigval."""
    eigvals = np.asarray(spec.eigvals, dtype=np.float64)
    eigvecs = np.asarray(spec.eigvecs, dtype=np.float64)
    return np.asarray(offsets, dtype=np.float64) @ eigvecs * 255.0 / eigvals


def center_draws(num_samples: int, spec: AugmentSpec) -> AugmentDraws:
    """Draws that reproduce validation: central crop, no flip, no lighting."""
    center = np.full(num_samples, spec.center_offset, dtype=np.int16)
    return AugmentDraws(
        center, center.copy(), np.zeros(num_samples, bool), np.zeros((num_samples, 3), np.float32)
    )


def coordinates() -> np.ndarray:
    rows, columns = np.mgrid[0:256, 0:256]
    return np.stack([columns, rows, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def test_lighting_offset_is_the_spec_formula():
    spec, _ = make_spec()
    alpha = np.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]], np.float32)
    expected = np.zeros(3)
    for component in range(3):  # eigvecs @ (alpha * eigvals) / 255, written out
        expected += EIGVECS[:, component] * alpha[0, component] * STATS["eigvals"][component]
    expected /= 255.0
    offsets = lighting_offsets(alpha, spec)
    np.testing.assert_allclose(offsets[0], expected, rtol=1e-5)
    np.testing.assert_array_equal(offsets[1], 0.0)
    np.testing.assert_allclose(recover_alphas(offsets, spec), alpha, atol=1e-5)


def test_draws_are_reproducible_and_change_with_epoch_and_seed():
    spec, _ = make_spec()
    first = draw_augmentation(5, 2, 1000, spec)
    again = draw_augmentation(5, 2, 1000, spec)
    for name in ("offset_x", "offset_y", "flip", "alpha"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.offset_x, draw_augmentation(5, 3, 1000, spec).offset_x)
    assert not np.array_equal(first.offset_x, draw_augmentation(6, 2, 1000, spec).offset_x)
    # lighting_std only scales alpha: a zero-lighting twin crops and flips the same
    twin = draw_augmentation(5, 2, 1000, make_spec(lighting_std=0.0)[0])
    np.testing.assert_array_equal(first.offset_x, twin.offset_x)
    np.testing.assert_array_equal(first.flip, twin.flip)
    np.testing.assert_array_equal(twin.alpha, 0.0)


def test_draw_distributions():
    spec, _ = make_spec(lighting_std=0.1)
    draws = draw_augmentation(0, 0, 33 * 600, spec)
    for offsets in (draws.offset_x, draws.offset_y):
        counts = np.bincount(offsets, minlength=33)
        assert len(counts) == 33 and counts.min() > 500 and counts.max() < 700
    assert abs(draws.flip.mean() - 0.5) < 0.02
    assert abs(draws.alpha.std() - 0.1) < 0.003 and abs(draws.alpha.mean()) < 0.003


def test_spec_paper_uses_central_mean_crop_and_channel_uses_rgb_stats():
    spec, mean_image = make_spec("paper")
    assert spec.normalize is Normalize.PAPER and spec.max_offset == 32 and spec.center_offset == 16
    np.testing.assert_array_equal(spec.mean_image, mean_image[16:240, 16:240])
    assert spec.channel_mean == (0.0, 0.0, 0.0) and spec.channel_std == (1.0, 1.0, 1.0)
    channel, _ = make_spec("channel")
    assert channel.mean_image is None
    assert channel.channel_mean == (120.0, 110.0, 100.0)
    assert channel.channel_std == (60.0, 55.0, 50.0)
    with pytest.raises(ValueError):
        make_spec("imagenet")


def test_crop_and_flip_take_the_right_pixels():
    image = coordinates()
    patch = crop_and_flip(image, 32, 5, False, 224)
    assert patch[0, 0, 0] == 32 and patch[0, 0, 1] == 5 and patch[0, -1, 0] == 255
    mirrored = crop_and_flip(image, 32, 5, True, 224)
    assert mirrored[0, 0, 0] == 255 and mirrored[0, -1, 0] == 32 and mirrored[-1, 0, 1] == 228


@pytest.mark.parametrize("normalize", ["paper", "channel"])
def test_train_reference_values(normalize):
    spec, mean_image = make_spec(normalize)
    image = coordinates()
    alpha = np.array([0.5, -1.0, 2.0], np.float32)
    output = train_reference(image, 3, 30, True, alpha, spec)
    assert output.shape == (3, 224, 224) and output.dtype == np.float32
    offset = lighting_offsets(alpha[None], spec)[0]
    patch = image[30:254, 3:227][:, ::-1].astype(np.float32) + offset
    if normalize == "paper":
        expected = patch - mean_image[16:240, 16:240]
    else:
        expected = (patch - np.array(STATS["mean_rgb"])) / np.array(STATS["std_rgb"])
    np.testing.assert_allclose(output, expected.transpose(2, 0, 1), atol=1e-4)
    # denormalize undoes the mean subtraction only: the crop with its lighting shift
    np.testing.assert_array_equal(
        denormalize(output[None], spec)[0], np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    )


def test_channel_shift_folds_lighting_into_the_mean():
    spec, _ = make_spec("channel")
    alpha = np.array([[1.0, 0.0, 0.0]], np.float32)
    expected = np.array(STATS["mean_rgb"]) - EIGVECS[:, 0] * 4000.0 / 255.0
    np.testing.assert_allclose(channel_shift(alpha, spec)[0], expected, rtol=1e-5)


def test_ten_crops_are_corners_centre_and_their_mirrors():
    spec, _ = make_spec("channel")
    geometry = ten_crop_geometry(spec)
    corners = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]
    assert geometry == [(x, y, False) for x, y in corners] + [(x, y, True) for x, y in corners]
    patches = val_reference(coordinates(), spec, ten_crop=True)
    assert patches.shape == (10, 3, 224, 224)
    np.testing.assert_array_equal(patches[5:], patches[:5, :, :, ::-1])
    np.testing.assert_array_equal(patches[4], val_reference(coordinates(), spec))
    # top-right corner: red (x) runs 32..255 left to right, green (y) 0..223
    top_right = denormalize(patches[1:2], spec)[0]
    assert top_right[0, 0, 0] == 32 and top_right[0, -1, 0] == 255 and top_right[-1, 0, 1] == 223


def test_center_draws_reproduce_validation():
    spec, _ = make_spec("paper")
    draws = center_draws(4, spec)
    image = coordinates()
    np.testing.assert_array_equal(
        train_reference(
            image, draws.offset_x[0], draws.offset_y[0], draws.flip[0], draws.alpha[0], spec
        ),
        val_reference(image, spec),
    )
