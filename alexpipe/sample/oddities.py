"""The files that trip up ImageNet readers, each named ``*.JPEG`` like the rest.

Real ILSVRC-2012 train holds CMYK JPEGs, a PNG named .JPEG, grayscale and
progressive JPEGs, EXIF-rotated photos; broken downloads add truncated and
empty files. ``--odd-files`` adds one of each kind so a build can be tested on
all of them. :data:`REJECTED_KINDS` are the ones a build must reject (docs/format.md);
the others must be decoded by content and converted to RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from alexpipe.sample.images import ImageSpec

EXIF_ORIENTATION_TAG = 0x0112
# Orientation 6: "rotate 90° clockwise to display", what phones write for a
# portrait shot taken with the sensor held sideways.
ROTATE_CLOCKWISE_TO_DISPLAY = 6

# kind -> PIL mode of the stored file (None: nothing decodable)
ODD_KINDS: dict[str, str | None] = {
    "cmyk-jpeg": "CMYK",
    "png-as-jpeg": "RGB",
    "grayscale-jpeg": "L",
    "progressive-jpeg": "RGB",
    "exif-rotated-jpeg": "RGB",
    "palette-png": "P",
    "rgba-png": "RGBA",
    "16bit-png": "I;16",
    "truncated-jpeg": "RGB",
    "zero-bytes": None,
}
REJECTED_KINDS = frozenset({"truncated-jpeg", "zero-bytes"})
# Val gets only kinds a build repairs, so a sample's val split is complete.
VAL_KINDS = ("cmyk-jpeg", "png-as-jpeg")


def stored_size(kind: str, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) a decoder reports for the stored file, before any EXIF
    transpose; ``None`` for an empty file."""
    if kind == "zero-bytes":
        return None
    if kind == "exif-rotated-jpeg":
        return (height, width)
    return (width, height)


def _save(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def encode_odd(image: Image.Image, kind: str, spec: ImageSpec) -> bytes:
    """The bytes of an odd file of ``kind`` showing the RGB ``image``."""
    quality = spec.quality
    if kind == "cmyk-jpeg":
        return _save(image.convert("CMYK"), "JPEG", quality=quality)
    if kind == "png-as-jpeg":
        return _save(image, "PNG")
    if kind == "grayscale-jpeg":
        return _save(image.convert("L"), "JPEG", quality=quality)
    if kind == "progressive-jpeg":
        return _save(image, "JPEG", quality=quality, progressive=True)
    if kind == "exif-rotated-jpeg":
        # Stored sideways; applying the EXIF orientation gives ``image`` back.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = ROTATE_CLOCKWISE_TO_DISPLAY
        stored = image.transpose(Image.Transpose.ROTATE_90)
        return _save(stored, "JPEG", quality=quality, exif=exif)
    if kind == "palette-png":
        return _save(image.quantize(colors=64), "PNG")
    if kind == "rgba-png":
        alpha = np.linspace(96, 255, image.width, dtype=np.float32)
        alpha = np.broadcast_to(alpha, (image.height, image.width)).astype(np.uint8)
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha, "L"))
        return _save(rgba, "PNG")
    if kind == "16bit-png":
        gray = np.asarray(image.convert("L")).astype(np.uint16) * 257
        return _save(Image.fromarray(gray), "PNG")
    if kind == "truncated-jpeg":
        whole = _save(image, "JPEG", quality=quality)
        return whole[: len(whole) // 2]
    if kind == "zero-bytes":
        return b""
    raise ValueError(f"unknown odd-file kind {kind!r}")
