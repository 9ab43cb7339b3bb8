"""One image in, one 256×256 baseline JPEG out: decode, repair, resize, crop, encode.

``process_image`` is a pure function of the input bytes and a frozen
:class:`TransformConfig`; the Ray job, the benchmark and the tests all call it.

Decisions (each also a reason two runs give the same bytes):

- Decoding is by content (whatever the file is called) and must consume the
  whole file: Pillow's ``LOAD_TRUNCATED_IMAGES`` stays False, so a cut-off
  file is rejected instead of padded with grey.
- Decompression bombs are refused from the header's size, before any pixel
  is decoded: width × height above ``max_pixels`` (default 89,478,485, Pillow's
  own warning threshold; ImageNet's largest image is far below) gives
  "decompression bomb: WxH pixels". Above twice Pillow's threshold Pillow
  itself refuses while reading the header, before the dimensions reach us,
  and the reason reads "decompression bomb: N pixels"; for the same reason a
  ``max_pixels`` above that hard limit (179 M) has no effect.
- JPEG draft (DCT scaling): libjpeg can decode at 1/2, 1/4 or 1/8 scale almost
  for free. We ask for the largest reduction that keeps both sides at least
  ``size``, so the shorter side is never below the target and the final
  resize still only shrinks. Pillow only reduces when a side is at least
  twice the target. The reduced image's exact extent (``draft``'s box) is
  kept, so the crop is placed in original coordinates without a half-pixel
  shift.
- The decoder: a plain JPEG (YCbCr or grayscale, at the drafted size) is
  decoded by libjpeg-turbo's TurboJPEG API through ``simplejpeg``, straight
  into an array, in strict mode (any libjpeg warning is an error). It gives
  the same pixels as Pillow's decoder (same library, same IDCT and chroma
  upsampling; tests/test_transform.py compares them) at 0.6-0.8× its CPU
  time: Pillow's line-by-line decoder loop is the difference. Anything else,
  or anything TurboJPEG balks at (a truncated or damaged file, CMYK, MPO), is
  decoded by Pillow exactly as before, so what is repaired or rejected, and
  why, does not change. The stored JPEG is decoded back the same way.
- Resize and crop are one ``Image.resize`` call with a ``box``: the central
  square of the image (center-crop) or the whole image (squash) is resampled
  straight to size×size, with Pillow's antialiased BICUBIC filter (support
  scales with the reduction, so it is a proper low-pass when shrinking).
- Encoding: baseline JPEG at ``quality``, 4:2:0 chroma subsampling (libjpeg's
  default and what ImageNet's own JPEGs mostly use), no progressive, no
  optimize, no metadata (EXIF, ICC, comments are not copied).
- EXIF orientation is ignored unless ``exif_transpose`` (torchvision parity);
  when asked, it is applied to the 256×256 result, which for a central square
  crop or a squash is the same geometry as rotating first, at 1/100 the cost.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
from PIL import Image

RESIZE_MODES = ("center-crop", "squash")
# Pillow's own warning threshold (about 89.5 megapixels, ~ 9459 × 9459).
DEFAULT_MAX_PIXELS = 89_478_485
RESAMPLE = Image.Resampling.BICUBIC
# Pillow warns above its own pixel limit; ours is checked in _open. Set once
# here: warnings.catch_warnings() per call is not thread-safe, and the build
# runs this module in several threads at once.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
SUBSAMPLING_420 = 2  # Pillow's code for 4:2:0
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: camera multi-picture files, JPEG inside
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class TransformConfig:
    """How every image is turned into a shard JPEG (see the module docstring).

    ``draft`` (on by default) only exists so benchmarks can measure what the
    DCT-scaled decode buys; it changes the output slightly, so a build keeps
    it fixed.
    """

    size: int = 256
    quality: int = 90
    resize: str = "center-crop"
    exif_transpose: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.size < 1 or not 1 <= self.quality <= 100 or self.max_pixels < 1:
            raise ValueError(f"invalid transform config {self}")


@dataclass(frozen=True, eq=False)
class Processed:
    """A usable image: the JPEG to store, what it was, what was repaired, and
    ``pixels`` (uint8 size×size×3 RGB) decoded back from ``jpg``: the image
    as stored, which is what the dataset statistics are computed over."""

    jpg: bytes
    orig_size: tuple[int, int]  # (width, height) as stored in the input
    orig_mode: str  # Pillow mode of the input ("RGB", "CMYK", "L", "P", ...)
    repairs: list[str] = field(default_factory=list)
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Rejected:
    """An unusable input and a short reason ("truncated image", ...)."""

    reason: str


def process_image(
    data: bytes, config: TransformConfig = TransformConfig(), decode_stored: bool = True
) -> Processed | Rejected:
    """Turn encoded image bytes into a size×size baseline JPEG, or say why not.

    ``decode_stored=False`` skips decoding the written JPEG back into
    ``pixels`` (left None) where no statistics are taken (val).
    """
    if not data:
        return Rejected("empty file")
    opened = _open(data, config.max_pixels)
    if isinstance(opened, Rejected):
        return opened
    image = opened
    orig_size = image.size
    orig_mode = image.mode
    repairs = [] if image.format in _JPEG_FORMATS else [f"{str(image.format).lower()}-content"]
    if _is_sixteen_bit_rgb(image):
        repairs.append("16bit->8bit")

    extent = (float(orig_size[0]), float(orig_size[1]))
    if config.draft and image.format in _JPEG_FORMATS:
        # Reduce by 2, 4 or 8 while both sides stay >= size (see module docstring).
        drafted = image.draft("RGB", (config.size, config.size))
        if drafted is not None:
            extent = drafted[1][2:]
    decoded = _decode_turbo(data, image)
    if decoded is not None:
        image = decoded
    else:
        try:
            image.load()
        except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, ...
            return Rejected(_load_failure(error))

    converted = _to_rgb(image)
    if isinstance(converted, Rejected):
        return converted
    image, conversion_repairs = converted
    repairs.extend(conversion_repairs)

    output = image.resize((config.size, config.size), RESAMPLE, box=_box(extent, config.resize))
    if config.exif_transpose:
        orientation = _orientation(opened)
        if orientation not in (None, 1):
            output = _transpose(output, orientation)
            repairs.append("exif-transposed")

    jpg = _encode(output, config.quality)
    pixels = _decode_stored(jpg) if decode_stored else None
    return Processed(jpg, orig_size, orig_mode, repairs, pixels)


def _decode_stored(jpg: bytes) -> np.ndarray:
    """The stored JPEG's RGB pixels (size×size×3, C-contiguous; the size is in the JPEG),
    as a loader decodes them.

    We wrote this JPEG (size×size, baseline, RGB), so TurboJPEG decodes it
    with nothing to find out first: the same pixels as Pillow's decoder
    (tests/test_transform.py compares them) at 0.6× its CPU time (0.42
    against 0.70 ms for a 256×256 image on this project's 2-core machine).
    """
    return simplejpeg.decode_jpeg(jpg, colorspace="RGB", strict=True)


# Pillow's modes of a drafted plain JPEG, and TurboJPEG's colour space for each.
_TURBO_COLORSPACES = {"RGB": "RGB", "L": "GRAY"}


def _decode_turbo(data: bytes, image: Image.Image) -> Image.Image | None:
    """``image`` (opened, drafted, not loaded) decoded by TurboJPEG, or None to let
    Pillow decode it (see the module docstring).

    The size Pillow's draft chose is asked for as the minimum; TurboJPEG then
    takes the same DCT scale (the smallest that reaches it), and a result of
    any other size is not used.
    """
    colorspace = _TURBO_COLORSPACES.get(image.mode)
    if image.format != "JPEG" or colorspace is None:
        return None
    width, height = image.size
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace=colorspace, min_width=width, min_height=height, strict=True
        )
    except ValueError:  # TurboJPEG's error, or a warning in strict mode
        return None
    if pixels.shape[:2] != (height, width):
        return None
    return Image.fromarray(pixels if image.mode == "RGB" else pixels[:, :, 0], image.mode)


def _open(data: bytes, max_pixels: int):
    """Identify the image and check its size from the header alone."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # Pillow refuses outright above twice its limit, before we see the size.
        match = re.search(r"\((\d+) pixels\)", str(error))
        return Rejected(f"decompression bomb: {match.group(1) if match else 'too many'} pixels")
    except Image.UnidentifiedImageError:
        return Rejected("unreadable: not a known image format")
    except Exception as error:
        return Rejected(_load_failure(error))
    width, height = image.size
    if width * height > max_pixels:
        return Rejected(f"decompression bomb: {width}x{height} pixels")
    if width < 1 or height < 1:
        return Rejected(f"unreadable: empty {width}x{height} image")
    return image


def _load_failure(error: Exception) -> str:
    message = str(error).strip() or type(error).__name__
    if "truncated" in message.lower() or isinstance(error, EOFError):
        return "truncated image"
    return f"unreadable: {message[:120]}"


def _is_sixteen_bit_rgb(image: Image.Image) -> bool:
    """16-bit RGB(A) PNGs open as 8-bit RGB (Pillow keeps the high bytes)."""
    if image.mode not in ("RGB", "RGBA") or not getattr(image, "tile", None):
        return False
    args = image.tile[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ";16" in rawmode


def _to_rgb(image: Image.Image):
    """The image in RGB, and the repairs that took (``[]`` for RGB input)."""
    mode = image.mode
    if mode == "RGB":
        return image, []
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 (near-white images);
        # scale the 0..65535 range down instead, with rounding.
        values = np.asarray(image).astype(np.int64)
        scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        gray = Image.fromarray(scaled.astype(np.uint8), "L")
        return gray.convert("RGB"), ["16bit->8bit", "grayscale->rgb"]
    if mode == "F":
        gray = Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8), "L")
        return gray.convert("RGB"), ["float->8bit", "grayscale->rgb"]
    repairs = {
        "1": ["bilevel->rgb"],
        "L": ["grayscale->rgb"],
        "LA": ["grayscale->rgb", "alpha-dropped"],
        "La": ["grayscale->rgb", "alpha-dropped"],
        "P": ["palette->rgb"],
        "PA": ["palette->rgb", "alpha-dropped"],
        "RGBA": ["alpha-dropped"],
        "RGBa": ["alpha-dropped"],
        "CMYK": ["cmyk->rgb"],
    }.get(mode, [f"{mode.lower()}->rgb"])
    if mode == "P" and "transparency" in image.info:
        repairs = ["palette->rgb", "alpha-dropped"]
    try:
        # Alpha is dropped, not composited (torchvision's ``convert("RGB")``).
        source = image.convert("RGBA") if mode in ("PA", "La") else image
        return source.convert("RGB"), repairs
    except (ValueError, OSError) as error:
        return Rejected(f"unreadable: cannot convert mode {mode} to RGB ({error})")


def _box(extent: tuple[float, float], resize: str) -> tuple[float, float, float, float]:
    """The source region that becomes the output, in the (drafted) image's pixels."""
    width, height = extent
    if resize == "squash":
        return (0.0, 0.0, width, height)
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block is no reason to lose the image
        return None


_TRANSPOSES = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


def _transpose(image: Image.Image, orientation: int) -> Image.Image:
    """What ``ImageOps.exif_transpose`` does for this EXIF orientation."""
    for method in _TRANSPOSES.get(orientation, []):
        image = image.transpose(method)
    return image


def _encode(image: Image.Image, quality: int) -> bytes:
    image.info = {}  # never carry the source's comment, EXIF or ICC profile along
    buffer = io.BytesIO()
    image.save(
        buffer,
        format="JPEG",
        quality=quality,
        subsampling=SUBSAMPLING_420,
        optimize=False,
        progressive=False,
    )
    return buffer.getvalue()
