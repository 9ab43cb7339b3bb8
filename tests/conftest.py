"""Shared fixtures: a tiny but real shard directory (tars, DALI indexes, manifest, stats).

The images are coordinate-encoded so a test can read back where a crop came
from: red = x, green = y (0..255 across the 256×256 image), blue = a smooth
per-image texture. Saved as JPEG quality 95 without chroma subsampling, the
gradients survive within a level or two, and a column or row mean recovers
the crop offset exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.manifest import ClassInfo, Manifest, SplitEntry, write_json_atomic, write_manifest
from shards.writer import ShardSample, write_shard

IMAGE_SIZE = 256
NUM_CLASSES = 3
TRAIN_IMAGES = 96
VAL_IMAGES = 13
TRAIN_SHARD_SIZE = 20  # 5 shards, the last one short
VAL_SHARD_SIZE = 5


def coordinate_image(seed: int, sharp: bool = False) -> np.ndarray:
    """uint8 256×256×3: R = x, G = y, B = a smooth random texture (blocks with hard
    edges if ``sharp``: colour edges, where decoders' chroma upsampling differs)."""
    rows, columns = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    generator = np.random.default_rng(seed)
    coarse = generator.integers(0, 256, (8, 8), dtype=np.uint8)
    resample = Image.NEAREST if sharp else Image.BICUBIC
    texture = np.asarray(Image.fromarray(coarse).resize((IMAGE_SIZE, IMAGE_SIZE), resample))
    return np.stack([columns, rows, texture], axis=-1).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, subsampling: int = 0) -> bytes:
    """Quality 95; ``subsampling`` is PIL's: 0 for 4:4:4, 2 for 4:2:0 (what builds write)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, subsampling=subsampling)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def dataset_stats(images: list[np.ndarray]) -> tuple[dict, np.ndarray]:
    """stats.json content and the mean image, over every pixel, as the real build computes."""
    stack = np.stack(images).astype(np.float64)
    pixels = stack.reshape(-1, 3)
    mean_rgb = pixels.mean(axis=0)
    covariance = np.cov(pixels, rowvar=False, bias=True)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    order = np.argsort(eigvals)[::-1]
    stats = {
        "num_images": len(images),
        "num_pixels": int(pixels.shape[0]),
        "mean_rgb": mean_rgb.tolist(),
        "std_rgb": np.sqrt(np.diag(covariance)).tolist(),
        "cov_rgb": covariance.tolist(),
        "eigvals": eigvals[order].tolist(),
        "eigvecs": eigvecs[:, order].tolist(),
        "scale": "0-255",
    }
    return stats, stack.mean(axis=0).astype(np.float32)


def _write_split(out: Path, split: str, samples: list[ShardSample], shard_size: int) -> SplitEntry:
    shards = [
        write_shard(out / f"{split}-{shard_index:06d}.tar", samples[start : start + shard_size])
        for shard_index, start in enumerate(range(0, len(samples), shard_size))
    ]
    return SplitEntry(len(samples), 0, tuple(shards))


def build_shard_dir(
    out: Path,
    train_images: int = TRAIN_IMAGES,
    val_images: int = VAL_IMAGES,
    subsampling: int = 0,
    sharp: bool = False,
) -> Path:
    """Write a complete shard directory (manifest, stats, mean, shards) into ``out``;
    ``subsampling`` and ``sharp`` as for :func:`encode_jpeg` and :func:`coordinate_image`."""
    out.mkdir(parents=True, exist_ok=True)
    splits, decoded_train = {}, []
    for split, count, seed_base in (("train", train_images, 0), ("val", val_images, 10_000)):
        samples = []
        for index in range(count):
            jpg = encode_jpeg(coordinate_image(seed_base + index, sharp), subsampling)
            if split == "train":
                decoded_train.append(decode_jpeg(jpg))
            key = f"{split}_{index:05d}"
            meta = {
                "index": index,
                "wnid": f"n{index % NUM_CLASSES:08d}",
                "source": key,
                "orig_size": [IMAGE_SIZE, IMAGE_SIZE],
                "orig_mode": "RGB",
                "repairs": [],
            }
            samples.append(ShardSample(key, jpg, index % NUM_CLASSES, meta))
        if split == "train":  # spread over shards by a seeded permutation, like the build
            order = np.random.default_rng(0).permutation(count)
            samples = [samples[int(position)] for position in order]
        size = TRAIN_SHARD_SIZE if split == "train" else VAL_SHARD_SIZE
        splits[split] = _write_split(out, split, samples, size)
    stats, mean_image = dataset_stats(decoded_train)
    write_json_atomic(out / "stats.json", stats)
    np.save(out / "mean.npy", mean_image)
    manifest = Manifest(
        config={
            "size": IMAGE_SIZE,
            "quality": 95,
            "resize": "center-crop",
            "shard_size": TRAIN_SHARD_SIZE,
            "seed": 0,
            "layout": "folder",
        },
        classes=tuple(
            ClassInfo(label, f"n{label:08d}", f"class {label}") for label in range(NUM_CLASSES)
        ),
        splits=splits,
        rejected=None,
    )
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    """A small shard directory shared by the loader tests (read-only for them)."""
    return build_shard_dir(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def shard_stats(shard_dir) -> dict:
    return json.loads((shard_dir / "stats.json").read_text())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module that asks for it: on shared
    cores, spinning OpenMP threads cost more than they give."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
