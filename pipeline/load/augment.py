"""The one description of AlexNet's data augmentation, shared by both loader backends.

Train (the paper's section 4.1): a random 224×224 crop of the 256×256
image (offsets 0..32 on each axis, every value equally likely), a horizontal
flip with p=0.5, PCA lighting, then mean subtraction. Val: the central crop,
or the paper's ten patches, no randomness.

Everything random is drawn here, in numpy, from ``(seed, epoch)`` and the
sample's position in the split — never inside DALI or a worker process — so
that both backends apply the very same crop, flip and lighting to the same
sample, a sample's augmentation does not depend on the number of ranks, and
tests can pin the draws. The DALI pipeline receives the draws as per-sample
operator arguments; the reference functions below apply them in numpy.

Normalization is written once for both modes as
``(pixel + lighting_offset - pixel_mean) / channel_std`` with
``pixel_mean = channel_mean + mean_image``:

- ``paper``: ``channel_mean`` 0, ``channel_std`` 1, ``mean_image`` the
  central 224 crop of mean.npy (the same crop for every patch);
- ``channel``: ``channel_mean`` = mean_rgb, ``channel_std`` = std_rgb, no
  mean image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

IMAGE_SIZE = 256
CROP_SIZE = 224
FLIP_PROBABILITY = 0.5
DEFAULT_LIGHTING_STD = 0.1
# Independent random streams per (seed, epoch): changing how one is drawn
# never shifts the other.
AUGMENT_STREAM = 1


class Normalize(str, Enum):
    """Mean subtraction mode (``create_loader(normalize=...)``)."""

    PAPER = "paper"
    CHANNEL = "channel"


@dataclass(frozen=True)
class AugmentSpec:
    """Everything both backends need to turn a decoded 256×256 RGB image into model input."""

    eigvals: tuple[float, float, float]
    eigvecs: tuple[tuple[float, ...], ...]  # column k is the eigenvector of eigvals[k]
    channel_mean: tuple[float, float, float]
    channel_std: tuple[float, float, float]
    mean_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    normalize: Normalize = Normalize.PAPER
    lighting_std: float = DEFAULT_LIGHTING_STD
    image_size: int = IMAGE_SIZE
    crop_size: int = CROP_SIZE
    flip_probability: float = FLIP_PROBABILITY

    @property
    def max_offset(self) -> int:
        """Largest crop offset on each axis (32 for 224 of 256)."""
        return self.image_size - self.crop_size

    @property
    def center_offset(self) -> int:
        """Offset of the central crop on each axis (16 for 224 of 256)."""
        return self.max_offset // 2


@dataclass(frozen=True)
class AugmentDraws:
    """Per-sample random draws of one epoch, indexed by the sample's position in the split."""

    offset_x: np.ndarray  # int, 0..max_offset
    offset_y: np.ndarray  # int, 0..max_offset
    flip: np.ndarray  # bool
    alpha: np.ndarray  # float, [N, 3], already scaled by lighting_std


def spec_from_stats(
    stats: dict,
    mean_image: np.ndarray,
    normalize: str | Normalize = Normalize.PAPER,
    lighting_std: float = DEFAULT_LIGHTING_STD,
) -> AugmentSpec:
    """Build the spec from ``stats.json`` (0..255 units) and ``mean.npy`` (256×256×3)."""
    normalize = Normalize(normalize)
    if lighting_std < 0:
        raise ValueError(f"lighting_std must be >= 0, got {lighting_std}")
    eigvals = tuple(float(value) for value in stats["eigvals"])
    eigvecs = tuple(tuple(float(value) for value in row) for row in stats["eigvecs"])
    mean_image = np.asarray(mean_image, dtype=np.float32)
    if mean_image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"mean image must be {IMAGE_SIZE}x{IMAGE_SIZE}x3, got {mean_image.shape}")
    if normalize is Normalize.PAPER:
        start = (IMAGE_SIZE - CROP_SIZE) // 2
        crop = mean_image[start : start + CROP_SIZE, start : start + CROP_SIZE]
        return AugmentSpec(
            eigvals=eigvals,
            eigvecs=eigvecs,
            channel_mean=(0.0, 0.0, 0.0),
            channel_std=(1.0, 1.0, 1.0),
            mean_image=np.ascontiguousarray(crop),
            normalize=normalize,
            lighting_std=float(lighting_std),
        )
    return AugmentSpec(
        eigvals=eigvals,
        eigvecs=eigvecs,
        channel_mean=tuple(float(value) for value in stats["mean_rgb"]),
        channel_std=tuple(float(value) for value in stats["std_rgb"]),
        normalize=normalize,
        lighting_std=float(lighting_std),
    )


def mean_image_chw(spec: AugmentSpec) -> np.ndarray | None:
    """The mean image to subtract after cropping, as float32 3×224×224 (None in channel mode)."""
    if spec.mean_image is None:
        return None
    return np.ascontiguousarray(spec.mean_image.transpose(2, 0, 1), dtype=np.float32)


# --- random draws -------------------------------------------------------------------------


def draw_augmentation(seed: int, epoch: int, num_samples: int, spec: AugmentSpec) -> AugmentDraws:
    """The crops, flips and lighting alphas of every sample of the split for one epoch.

    A function of ``(seed, epoch)`` only: the same on every rank and for any
    world size. Alphas are standard normals scaled by ``lighting_std``, so a
    run with ``lighting_std=0`` draws the same crops and flips (a "twin" that
    isolates the lighting offset).
    """
    generator = np.random.default_rng(np.random.SeedSequence([seed, epoch, AUGMENT_STREAM]))
    offsets = generator.integers(0, spec.max_offset + 1, size=(2, num_samples), dtype=np.int16)
    flip = generator.random(num_samples) < spec.flip_probability
    alpha = generator.standard_normal((num_samples, 3), dtype=np.float32)
    return AugmentDraws(offsets[0], offsets[1], flip, alpha * np.float32(spec.lighting_std))


# --- lighting -----------------------------------------------------------------------------


def lighting_offsets(alpha: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """Per-image RGB offsets in 0..255 units: ``eigvecs @ (alpha * eigvals) / 255``.

    This is the paper's formula on pixels scaled to [0, 1] (eigenvalues of a
    0..255 covariance are 255² too large there), brought back to 0..255.
    ``alpha`` is [N, 3]; the result is [N, 3] float32.
    """
    eigvals = np.asarray(spec.eigvals, dtype=np.float64)
    eigvecs = np.asarray(spec.eigvecs, dtype=np.float64)
    scaled = np.asarray(alpha, dtype=np.float64) * eigvals
    return (scaled @ eigvecs.T / 255.0).astype(np.float32)


def channel_shift(alpha: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """Per-sample value subtracted per channel: ``channel_mean - lighting_offset``, [N, 3].

    Folding the lighting offset into the per-channel mean lets one fused
    crop-mirror-normalize operator do crop, flip, lighting and channel
    normalization in a single pass.
    """
    return (np.asarray(spec.channel_mean, np.float32) - lighting_offsets(alpha, spec)).astype(
        np.float32
    )


# --- ten crops ----------------------------------------------------------------------------


def ten_crop_geometry(spec: AugmentSpec) -> list[tuple[int, int, bool]]:
    """The paper's ten test patches as (offset_x, offset_y, mirrored).

    Order: top-left, top-right, bottom-left, bottom-right, centre, then the
    horizontal reflections of those same five patches (patch k + 5 is patch
    k mirrored).
    """
    last, center = spec.max_offset, spec.center_offset
    corners = [(0, 0), (last, 0), (0, last), (last, last), (center, center)]
    return [(x, y, False) for x, y in corners] + [(x, y, True) for x, y in corners]


# --- numpy reference (the oracle for the DALI pipeline, and the torch backend) ------------


def crop_and_flip(image: np.ndarray, offset_x: int, offset_y: int, flip: bool, size: int):
    """The ``size``×``size`` patch of an H×W×3 image at (x, y), mirrored left-right if ``flip``."""
    patch = image[offset_y : offset_y + size, offset_x : offset_x + size]
    if patch.shape[:2] != (size, size):
        raise ValueError(f"crop at ({offset_x}, {offset_y}) leaves image {image.shape[:2]}")
    return patch[:, ::-1] if flip else patch


def normalize_patch(patch: np.ndarray, shift: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """uint8 H×W×3 patch -> float32 3×H×W: ``(patch - shift - mean_image) / channel_std``.

    ``shift`` is this sample's :func:`channel_shift` (channel mean minus the
    lighting offset).
    """
    values = patch.astype(np.float32) - np.asarray(shift, np.float32)
    if spec.mean_image is not None:
        values -= spec.mean_image
    values /= np.asarray(spec.channel_std, np.float32)
    return np.ascontiguousarray(values.transpose(2, 0, 1))


def train_reference(
    image: np.ndarray, offset_x: int, offset_y: int, flip: bool, alpha: np.ndarray, spec
) -> np.ndarray:
    """One train sample, as the trainer sees it: 3×224×224 float32."""
    patch = crop_and_flip(image, int(offset_x), int(offset_y), bool(flip), spec.crop_size)
    shift = channel_shift(np.asarray(alpha, np.float32)[None], spec)[0]
    return normalize_patch(patch, shift, spec)


def val_reference(image: np.ndarray, spec: AugmentSpec, ten_crop: bool = False) -> np.ndarray:
    """One val sample: the central crop (3×224×224), or the ten patches (10×3×224×224)."""
    shift = np.asarray(spec.channel_mean, np.float32)
    if not ten_crop:
        center = spec.center_offset
        return normalize_patch(
            crop_and_flip(image, center, center, False, spec.crop_size), shift, spec
        )
    patches = [
        normalize_patch(crop_and_flip(image, x, y, mirrored, spec.crop_size), shift, spec)
        for x, y, mirrored in ten_crop_geometry(spec)
    ]
    return np.stack(patches)


def denormalize(images: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """Model input (N×3×224×224) back to viewable uint8 N×224×224×3.

    Undoes the mean subtraction and scaling only, so crops, flips and the
    lighting shift stay visible (this is what ``alexpipe preview`` shows).
    """
    values = np.asarray(images, np.float32).transpose(0, 2, 3, 1)
    values = values * np.asarray(spec.channel_std, np.float32)
    values = values + np.asarray(spec.channel_mean, np.float32)
    if spec.mean_image is not None:
        values = values + spec.mean_image
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
