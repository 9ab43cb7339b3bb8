"""process_image: odd inputs repaired, bad inputs rejected, geometry and colours kept."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipeline.build.transform import Processed, Rejected, TransformConfig, process_image

RED, BLUE, GREEN = (220, 20, 30), (20, 40, 210), (30, 200, 40)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def processed(data: bytes, **config) -> Processed:
    result = process_image(data, TransformConfig(**config))
    assert isinstance(result, Processed), result
    assert result.pixels.shape == (256, 256, 3) and result.pixels.dtype == np.uint8
    with Image.open(io.BytesIO(result.jpg)) as stored:
        assert stored.format == "JPEG" and stored.mode == "RGB" and stored.size == (256, 256)
        assert np.array_equal(np.asarray(stored), result.pixels)
    return result


def assert_colour(pixels: np.ndarray, colour, tolerance: float = 3) -> None:
    difference = np.abs(pixels.reshape(-1, 3).astype(int) - np.array(colour)).max()
    assert difference <= tolerance, (pixels.reshape(-1, 3).mean(axis=0), colour)


def halves(size, left, right) -> Image.Image:
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def test_solid_rgb_jpeg_keeps_its_colour_and_is_baseline_420():
    result = processed(encode(Image.new("RGB", (500, 375), RED), quality=95))
    assert result.orig_size == (500, 375) and result.orig_mode == "RGB" and result.repairs == []
    assert_colour(result.pixels, RED)
    assert b"\xff\xc0" in result.jpg[:1000] and b"\xff\xc2" not in result.jpg  # SOF0, no SOF2
    with Image.open(io.BytesIO(result.jpg)) as stored:
        assert JpegImagePlugin.get_sampling(stored) == 2  # 4:2:0
        assert "progressive" not in stored.info and "exif" not in stored.info


def test_center_crop_keeps_left_and_right_halves():
    for size in [(600, 300), (300, 600), (2000, 1000)]:  # the last one is drafted
        pixels = processed(encode(halves(size, RED, BLUE), quality=95)).pixels
        assert_colour(pixels[:, :120], RED, tolerance=6)
        assert_colour(pixels[:, 136:], BLUE, tolerance=6)


def test_center_crop_cuts_the_sides_and_squash_keeps_them():
    pixels = np.empty((300, 600, 3), np.uint8)
    pixels[:] = BLUE
    pixels[:, :150] = GREEN  # exactly what the central 300x300 crop leaves out
    data = encode(Image.fromarray(pixels), quality=95)
    cropped = processed(data).pixels
    assert_colour(cropped[:, 4:], BLUE, tolerance=6)
    squashed = processed(data, resize="squash").pixels
    assert_colour(squashed[:, :60], GREEN, tolerance=6)
    assert_colour(squashed[:, 70:], BLUE, tolerance=6)


def test_cmyk_jpeg_becomes_rgb():
    result = processed(encode(Image.new("CMYK", (600, 450), (0, 255, 255, 0)), quality=95))
    assert result.orig_mode == "CMYK" and result.repairs == ["cmyk->rgb"]
    assert_colour(result.pixels, (255, 0, 0))


def test_grayscale_jpeg_becomes_rgb():
    result = processed(encode(Image.new("L", (320, 240), 77), quality=95))
    assert result.orig_mode == "L" and result.repairs == ["grayscale->rgb"]
    assert_colour(result.pixels, (77, 77, 77))


def test_palette_png_named_anything_becomes_rgb():
    image = Image.new("P", (300, 200), 1)
    image.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    result = processed(encode(image, "PNG"))
    assert result.orig_mode == "P" and result.repairs == ["png-content", "palette->rgb"]
    assert_colour(result.pixels, GREEN)


def test_rgba_png_drops_alpha_without_compositing():
    result = processed(encode(Image.new("RGBA", (300, 300), (*BLUE, 0)), "PNG"))
    assert result.orig_mode == "RGBA" and result.repairs == ["png-content", "alpha-dropped"]
    assert_colour(result.pixels, BLUE)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    image = Image.fromarray(np.full((200, 300), 51400, np.uint16))  # 51400 / 257 = 200
    result = processed(encode(image, "PNG"))
    assert result.orig_mode == "I;16"
    assert result.repairs == ["png-content", "16bit->8bit", "grayscale->rgb"]
    assert_colour(result.pixels, (200, 200, 200))


def test_sixteen_bit_rgb_png_is_flagged():
    pixels = np.empty((100, 150, 3), np.uint16)
    pixels[:] = [c * 257 for c in GREEN]
    result = processed(png_rgb16(pixels))
    assert result.orig_mode == "RGB" and result.repairs == ["png-content", "16bit->8bit"]
    assert_colour(result.pixels, GREEN)


def test_progressive_jpeg_becomes_baseline():
    result = processed(encode(halves((640, 480), RED, BLUE), quality=90, progressive=True))
    assert result.repairs == [] and result.orig_size == (640, 480)
    assert b"\xff\xc2" not in result.jpg
    assert_colour(result.pixels[:, :120], RED, tolerance=6)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return encode(halves((400, 200), RED, BLUE), quality=95, exif=exif.tobytes())


def test_exif_orientation_is_ignored_unless_asked():
    stored = processed(exif_rotated_jpeg())
    assert stored.repairs == [] and stored.orig_size == (400, 200)
    assert_colour(stored.pixels[:, :120], RED, tolerance=6)
    assert_colour(stored.pixels[:, 136:], BLUE, tolerance=6)

    upright = processed(exif_rotated_jpeg(), exif_transpose=True)
    assert upright.repairs == ["exif-transposed"] and upright.orig_size == (400, 200)
    # Rotated clockwise for display: the left (red) half is now on top.
    assert_colour(upright.pixels[:120], RED, tolerance=6)
    assert_colour(upright.pixels[136:], BLUE, tolerance=6)


def test_output_carries_no_source_metadata():
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    data = encode(Image.new("RGB", (300, 300), RED), quality=90, exif=exif, comment=b"secret")
    result = processed(data)
    assert b"CameraMaker" not in result.jpg and b"secret" not in result.jpg


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image", "unreadable: not a known image format"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "truncated image"),
    ],
)
def test_rejects_empty_and_unreadable(data, reason):
    assert process_image(data, TransformConfig()) == Rejected(reason)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_rejects_truncated_files(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    for fraction in (0.3, 0.9, 0.995):
        assert process_image(data[: int(len(data) * fraction)]) == Rejected("truncated image")
    assert isinstance(process_image(data), Processed)


def png_header_only(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def jpeg_header_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16)), quality=90))
    start_of_frame = data.find(b"\xff\xc0")
    data[start_of_frame + 5 : start_of_frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_rejects_decompression_bombs_from_the_header():
    # Far above the limit: Pillow itself refuses while reading the header.
    assert process_image(png_header_only(30000, 30000)) == Rejected(
        "decompression bomb: 900000000 pixels"
    )
    assert process_image(jpeg_header_claiming(30000, 30000)) == Rejected(
        "decompression bomb: 900000000 pixels"
    )
    # Above our limit but below Pillow's hard one: our check, no pixel decoded.
    assert process_image(png_header_only(10000, 9000)) == Rejected(
        "decompression bomb: 10000x9000 pixels"
    )
    small_limit = TransformConfig(max_pixels=1000)
    data = encode(Image.new("RGB", (50, 40), RED))
    assert process_image(data, small_limit) == Rejected("decompression bomb: 50x40 pixels")


def smooth_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 97.0) * np.cos(y / 61.0)],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8))


def test_draft_decoding_matches_full_decoding():
    data = encode(smooth_image(1600, 1100), quality=95)  # drafted by 4 to 400x275
    drafted = processed(data).pixels.astype(int)
    full = processed(data, draft=False).pixels.astype(int)
    assert np.abs(drafted - full).mean() < 1.0
    assert np.abs(drafted - full).max() < 12
    # Geometry: the gradients (which encode x and y) line up to within a pixel.
    assert abs(drafted[..., 0].mean() - full[..., 0].mean()) < 1.0
    assert abs(drafted[..., 1].mean() - full[..., 1].mean()) < 1.0


def test_same_input_gives_same_bytes_and_quality_matters():
    data = encode(smooth_image(500, 375), quality=90)
    first, second = process_image(data), process_image(data)
    assert first.jpg == second.jpg
    assert len(process_image(data, TransformConfig(quality=50)).jpg) < len(first.jpg)


def test_small_images_are_upscaled_and_sizes_are_configurable():
    result = process_image(encode(Image.new("RGB", (40, 30), GREEN)), TransformConfig(size=64))
    assert result.pixels.shape == (64, 64, 3)
    assert_colour(result.pixels, GREEN)


def test_config_is_validated():
    with pytest.raises(ValueError):
        TransformConfig(resize="stretch")


@pytest.mark.parametrize(
    "size, drafted",
    [
        ((511, 400), (511, 400)),
        ((1100, 520), (550, 260)),
        ((4000, 1030), (1000, 258)),
        ((2048, 2048), (256, 256)),
    ],
)
def test_draft_rule_keeps_the_shorter_side_at_least_the_target(size, drafted):
    # The assumption process_image builds on: Pillow reduces by 2, 4 or 8 only
    # as far as both sides stay >= the requested size.
    with Image.open(io.BytesIO(encode(Image.new("RGB", size, RED)))) as image:
        image.draft("RGB", (256, 256))
        assert image.size == drafted


def test_stored_pixels_are_what_pillow_decodes_on_real_photographs(tmp_path):
    from alexpipe.sample.photos import write_photo_folder

    folder = write_photo_folder(tmp_path, num_classes=10, train_per_class=2, val_per_class=0)
    paths = sorted((folder.root / "train").rglob("*.JPEG"))
    assert len(paths) == 20
    for path in paths:
        result = process_image(path.read_bytes())
        with Image.open(io.BytesIO(result.jpg)) as stored:
            assert np.array_equal(np.asarray(stored.convert("RGB")), result.pixels), path.name
        assert result.pixels.flags.c_contiguous


def _pillow_and_turbo(data: bytes, size: int = 256):
    """The drafted image as Pillow decodes it, and as the TurboJPEG path does (or None)."""
    from pipeline.build.transform import _decode_turbo

    reference = Image.open(io.BytesIO(data))
    reference.draft("RGB", (size, size))
    turbo = Image.open(io.BytesIO(data))
    turbo.draft("RGB", (size, size))
    fast = _decode_turbo(data, turbo)
    reference.load()
    return reference, fast


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_turbojpeg_decodes_real_photographs_as_pillow_does(tmp_path):
    """Same pixels at every DCT scale the draft picks, for ImageNet's size mix."""
    from alexpipe.sample.photos import write_photo_folder

    folder = write_photo_folder(tmp_path, num_classes=10, train_per_class=6, val_per_class=0)
    scales = set()
    for path in sorted((folder.root / "train").rglob("*.JPEG")):
        data = path.read_bytes()
        reference, fast = _pillow_and_turbo(data)
        assert fast is not None, path.name
        assert fast.mode == reference.mode and fast.size == reference.size, path.name
        assert np.array_equal(np.asarray(fast), np.asarray(reference)), path.name
        with Image.open(io.BytesIO(data)) as original:
            scales.add(original.size[0] // reference.size[0])
        assert process_image(data).jpg == process_image(data).jpg
    assert {1, 2} <= scales


@pytest.mark.parametrize(
    "options",
    [
        {"subsampling": 0},
        {"subsampling": 1},
        {"subsampling": 2, "quality": 100},
        {"progressive": True},
        {"optimize": True},
        {"restart_marker_blocks": 3},
        {"mode": "L"},
        {"mode": "L", "progressive": True},
    ],
    ids=lambda options: "-".join(f"{key}={value}" for key, value in options.items()),
)
@pytest.mark.parametrize("size", [(517, 389), (1030, 771), (2111, 263), (257, 256), (97, 61)])
def test_turbojpeg_decodes_every_plain_jpeg_as_pillow_does(options, size):
    rng = np.random.default_rng(size[0])
    smooth = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(smooth, "RGB").resize(size, Image.Resampling.BICUBIC)
    options = dict(options)
    mode = options.pop("mode", "RGB")
    data = _jpeg(picture.convert(mode), **options)
    reference, fast = _pillow_and_turbo(data)
    assert fast is not None
    assert fast.mode == reference.mode == mode and fast.size == reference.size
    assert np.array_equal(np.asarray(fast), np.asarray(reference))


def test_pillow_decodes_what_turbojpeg_does_not():
    """CMYK, damaged and truncated JPEGs take Pillow's path, so their repair or
    rejection is exactly what it was."""
    picture = Image.fromarray(np.full((300, 400, 3), 90, np.uint8), "RGB")
    from pipeline.build.transform import _decode_turbo

    def turbo(data):
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (256, 256))
        return _decode_turbo(data, image)

    assert turbo(_jpeg(picture.convert("CMYK"))) is None
    data = _jpeg(picture, quality=90)
    assert turbo(data[: len(data) // 2]) is None
    assert process_image(data[: len(data) // 2]) == Rejected("truncated image")
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = b"\xff\xd9" * 32  # EOI markers inside the scan
    reference, fast = _pillow_and_turbo(bytes(damaged))
    assert fast is None or np.array_equal(np.asarray(fast), np.asarray(reference))
