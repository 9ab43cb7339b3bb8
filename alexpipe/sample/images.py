"""Synthetic, natural-looking photos with a learnable class signature.

Each class has a :class:`ClassStyle` (dominant hue, stripe orientation and
frequency, object shape); each image draws its own jitter, layout, size and
JPEG settings from an :class:`ImageSpec`. Everything is a pure function of
those two values, so the same (split, key) gives the same bytes in every
layout. Drawing is vectorised numpy at a low resolution, then a PIL resize to
the full size and a full-resolution grain: fast enough for hundreds of
realistic-size images per second on one core, no per-pixel Python.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("disc", "square", "diamond", "ring")
# The signature is drawn at this shorter side, then resized: stripes of up to
# ~12 cycles per shorter side keep >= 9 pixels per cycle here.
RENDER_SHORTER_SIDE = 112
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable after a resize to 256 and a 224 crop."""

    hue: float  # 0..1, the dominant hue of background and objects
    angle: float  # radians, orientation of the stripe texture
    frequency: float  # stripe cycles per shorter side
    shape: str  # one of SHAPES


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to draw and encode one image, deterministically."""

    width: int
    height: int
    quality: int  # JPEG quality 70..95
    subsampling: int  # PIL's code: 0 = 4:4:4, 2 = 4:2:0
    grayscale: bool
    content_seed: int
    style: ClassStyle


@functools.lru_cache(maxsize=16)
def _style_offsets(seed: int) -> tuple[float, float, float]:
    """The seeded (hue, angle, frequency) offsets shared by all classes."""
    hue_offset, angle_offset, frequency_offset = np.random.default_rng([seed, 0x57E1]).random(3)
    return hue_offset, angle_offset, frequency_offset


def class_style(label: int, num_classes: int, seed: int) -> ClassStyle:
    """The signature of class ``label``: hues evenly spread around the colour
    wheel (from a seeded offset), angles and frequencies on golden-ratio
    sequences so neighbouring hues differ in texture too."""
    hue_offset, angle_offset, frequency_offset = _style_offsets(seed)
    hue = (hue_offset + label / num_classes) % 1.0
    angle = math.pi * ((angle_offset + label * GOLDEN) % 1.0)
    frequency = 3.0 + 9.0 * ((frequency_offset + label * GOLDEN * GOLDEN) % 1.0)
    return ClassStyle(hue=hue, angle=angle, frequency=frequency, shape=SHAPES[label % len(SHAPES)])


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Soft-edged coverage (0..1) of a shape centred at u = v = 0."""
    if kind == "disc":
        distance = np.hypot(u, v) - radius
    elif kind == "square":
        distance = np.maximum(np.abs(u), np.abs(v)) - radius * 0.85
    elif kind == "diamond":
        distance = (np.abs(u) + np.abs(v)) - radius * 1.2
    else:  # ring
        distance = np.abs(np.hypot(u, v) - radius * 0.8) - radius * 0.25
    return np.clip(0.5 - distance / edge, 0.0, 1.0)


def _render_low(spec: ImageSpec, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """The picture at (width, height), float32 RGB in 0..1."""
    style = spec.style
    shorter = min(width, height)
    # Coordinates in units of the shorter side, so the signature is size-free.
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / shorter
    hue = style.hue + rng.normal(0.0, 0.02)

    # Background: a two-colour gradient in the class hue, like sky or a wall.
    near = _rgb(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.35, 0.8), rng.uniform(0.5, 0.95))
    far = _rgb(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.7))
    direction = rng.uniform(0.0, 2.0 * math.pi)
    ramp = x * math.cos(direction) + y * math.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = near * (1.0 - ramp[..., None]) + far * ramp[..., None]

    # Clouds: soft blobs of any hue, weak enough that the class hue dominates.
    for _ in range(int(rng.integers(2, 5))):
        centre_x, centre_y = rng.uniform(0, width / shorter), rng.uniform(0, height / shorter)
        radius = rng.uniform(0.15, 0.6)
        weight = rng.uniform(0.15, 0.35)
        blob = np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * radius * radius))
        colour = _rgb(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9))
        alpha = (weight * blob)[..., None]
        image = image * (1.0 - alpha) + colour * alpha

    # Mottle: smooth random brightness, like foliage or fur out of focus.
    grid = rng.normal(0.0, 1.0, size=(max(2, height // 12), max(2, width // 12)))
    mottle = Image.fromarray(grid.astype(np.float32), "F").resize(
        (width, height), Image.Resampling.BICUBIC
    )
    image = image * (1.0 + rng.uniform(0.04, 0.1) * np.asarray(mottle))[..., None]

    # Texture: stripes whose orientation and frequency belong to the class.
    angle = style.angle + rng.normal(0.0, 0.1)
    frequency = style.frequency * rng.uniform(0.88, 1.12)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    stripes = np.sin(2.0 * math.pi * frequency * along + phase)
    image = image * (1.0 + rng.uniform(0.12, 0.25) * stripes[..., None])

    # Objects: one to three shapes of the class, in a saturated class colour.
    edge = 1.5 / shorter
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.12, 0.3)
        centre_x = rng.uniform(radius, max(radius, width / shorter - radius))
        centre_y = rng.uniform(radius, max(radius, height / shorter - radius))
        turn = rng.uniform(0.0, 2.0 * math.pi)
        u = (x - centre_x) * math.cos(turn) + (y - centre_y) * math.sin(turn)
        v = (y - centre_y) * math.cos(turn) - (x - centre_x) * math.sin(turn)
        coverage = _shape_mask(style.shape, u, v, radius, edge)[..., None]
        colour = _rgb(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
        shaded = colour * (0.8 + 0.2 * stripes[..., None])
        image = image * (1.0 - coverage) + shaded * coverage
    return np.clip(image, 0.0, 1.0)


def render_image(spec: ImageSpec) -> Image.Image:
    """Draw the RGB picture described by ``spec`` (always RGB; encoders convert)."""
    rng = np.random.default_rng(spec.content_seed)
    shorter = min(spec.width, spec.height)
    low_scale = min(1.0, RENDER_SHORTER_SIDE / shorter)
    low_width = max(1, round(spec.width * low_scale))
    low_height = max(1, round(spec.height * low_scale))
    low = _render_low(spec, rng, low_width, low_height)
    picture = Image.fromarray((low * 255.0 + 0.5).astype(np.uint8), "RGB")
    if (low_width, low_height) != (spec.width, spec.height):
        picture = picture.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    # Sensor grain at full resolution, so the JPEG has real high frequencies.
    grain_level = int(rng.integers(2, 8))
    pixels = np.asarray(picture).astype(np.int16)
    pixels += rng.integers(-grain_level, grain_level + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(image: Image.Image, spec: ImageSpec) -> bytes:
    """Baseline JPEG with the spec's quality and subsampling (grayscale as mode L)."""
    if spec.grayscale:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=spec.quality, subsampling=spec.subsampling)
    return buffer.getvalue()
