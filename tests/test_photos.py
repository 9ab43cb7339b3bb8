"""The real-photograph corpus: ImageNet's size mix, deterministic bytes, learnable classes."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from alexpipe.sample.photos import PHOTO_FILES, imagenet_size, load_photos, write_photo_folder


def test_every_bundled_photo_loads_in_colour():
    photos = load_photos()
    assert len(photos) == len(PHOTO_FILES)
    assert all(photo.mode == "RGB" and min(photo.size) >= 300 for photo in photos)


def test_sizes_follow_imagenets_mix():
    rng = np.random.default_rng(0)
    sizes = [imagenet_size(rng) for _ in range(4000)]
    pixels = sorted(width * height for width, height in sizes)
    assert pixels[len(pixels) // 2] == 500 * 375
    longer = np.array([max(size) for size in sizes])
    assert 0.70 < np.mean(longer == 500) < 0.74
    assert 0.02 < np.mean(longer > 1000) < 0.04
    assert longer.max() <= 2400 and longer.min() >= 200


def test_folder_is_deterministic_and_labelled_by_directory(tmp_path):
    first = write_photo_folder(tmp_path / "a", num_classes=3, train_per_class=4, val_per_class=2)
    write_photo_folder(tmp_path / "b", num_classes=3, train_per_class=4, val_per_class=2)
    assert first.counts == {"train": 12, "val": 6}

    def digests(root):
        return {
            path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.JPEG"))
        }

    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    names = sorted(digests(tmp_path / "a"))
    assert names[0] == "train/n00000001/n00000001_0.JPEG"
    assert "val/n00000003/ILSVRC2012_val_00000003.JPEG" in names
    with Image.open(tmp_path / "a/train/n00000002/n00000002_1.JPEG") as image:
        assert image.format == "JPEG" and image.mode in ("RGB", "L")


def test_parallel_writing_gives_the_same_bytes_and_prefixes_are_folders(tmp_path):
    from alexpipe.sample.photos import photo_path

    serial = write_photo_folder(
        tmp_path / "serial", num_classes=4, train_per_class=3, val_per_class=1
    )
    parallel = write_photo_folder(
        tmp_path / "parallel", num_classes=4, train_per_class=3, val_per_class=1, workers=2
    )
    assert serial.total_bytes == parallel.total_bytes
    for position in range(12):
        one = photo_path(serial.root, "train", position, 4)
        assert one.read_bytes() == photo_path(parallel.root, "train", position, 4).read_bytes()
    # the first n positions of a split are what a folder of n images per class holds
    small = write_photo_folder(
        tmp_path / "small", num_classes=4, train_per_class=2, val_per_class=0
    )
    for position in range(8):
        path = photo_path(small.root, "train", position, 4)
        assert path.read_bytes() == photo_path(serial.root, "train", position, 4).read_bytes()
