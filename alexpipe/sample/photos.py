"""Real photographs at ImageNet's size mix, for benchmarks and tests of speed and learning.

Synthetic JPEGs decode at another speed than photographs (their entropy-coded
data is unlike a camera's), so whatever is timed, and whatever must really be
learned, uses these: the colour photographs that scikit-image and matplotlib
ship inside their wheels, cut and scaled the way ImageNet's own files are
sized.

- Sizes: 72 % have a 500 px long side (500×375, 500×333, 500×500, ...), 20 % a
  long side of 200..499 px, 8 % of 501..2400 px (about 3 % over 1000 px);
  four in five are landscape. The median is 500×375, as in ILSVRC-2012.
- Content: a random window of the class's photograph (half to all of its
  extent, never mirrored across classes), resampled with Lanczos. Where the
  photograph is large enough the window has at least as many pixels as the
  output, so it is shrunk, never enlarged: ImageNet's files are cameras'
  photographs scaled down, and an enlarged window is smoother (a smaller,
  faster-decoding JPEG) than any of them.
- 2 % are stored grayscale (mode L), as 2 % of ImageNet is.
- JPEG quality 95..100, 4:2:0. The bundled photographs are smoother than a
  camera's, so at Flickr's usual 90..98 their files come out at ~65 KB where
  ImageNet's average 108 KB (138 GB / 1.28 M); the entropy-coded bytes are what
  the decoder's time follows, so the quality is set to give ImageNet's bytes:
  a mean of ~109 KB, a median of ~94 KB (400 images).

Each image is a pure function of (seed, split, index): the same call writes
the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shards.errors import UserError

# (package, file inside it) of every colour photograph used; one per class.
PHOTO_FILES = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_right.png"),
)
GRAYSCALE_FRACTION = 0.02
ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)
ASPECT_WEIGHTS = (0.55, 0.25, 0.08, 0.07, 0.05)


@functools.cache
def load_photos() -> tuple[Image.Image, ...]:
    """The bundled colour photographs, in :data:`PHOTO_FILES` order (RGB, loaded once)."""
    photos = []
    for package, name in PHOTO_FILES:
        try:
            resource = importlib.resources.files(package).joinpath(name)
            with resource.open("rb") as handle:
                photos.append(Image.open(handle).convert("RGB"))
        except (ModuleNotFoundError, FileNotFoundError) as error:
            raise UserError(
                f"the real photographs come with scikit-image and matplotlib ({error}); "
                "install them: pip install scikit-image matplotlib"
            ) from None
    return tuple(photos)


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn from ImageNet's mix (see the module docstring)."""
    draw = rng.random()
    if draw < 0.72:
        longer = 500
    elif draw < 0.92:
        longer = int(rng.integers(200, 500))
    elif draw < 0.97:
        longer = int(rng.integers(501, 1001))
    else:
        longer = int(rng.integers(1001, 2401))
    aspect = float(rng.choice(ASPECTS, p=ASPECT_WEIGHTS))
    shorter = round(longer / aspect)
    return (longer, shorter) if rng.random() < 0.8 else (shorter, longer)


def render_photo(
    photo: Image.Image, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """A random window of ``photo`` with the aspect of ``size``, resampled to ``size``."""
    width, height = size
    photo_width, photo_height = photo.size
    largest = min(photo_width, photo_height * width / height)  # window width at full extent
    smallest = min(1.0, max(0.5, width / largest))  # no enlarging where the photo allows
    window_width = largest * rng.uniform(smallest, 1.0)
    window_height = window_width * height / width
    left = rng.uniform(0, max(0.0, photo_width - window_width))
    top = rng.uniform(0, max(0.0, photo_height - window_height))
    box = (left, top, left + window_width, top + window_height)
    return photo.resize(size, Image.Resampling.LANCZOS, box=box)


def photo_jpeg(label: int, rng: np.random.Generator) -> bytes:
    """One ImageNet-sized JPEG of class ``label``'s photograph."""
    photos = load_photos()
    image = render_photo(photos[label % len(photos)], imagenet_size(rng), rng)
    if rng.random() < GRAYSCALE_FRACTION:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(95, 101)), subsampling=2)
    return buffer.getvalue()


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"alexpipe-photos/{seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class PhotoFolder:
    """What :func:`write_photo_folder` wrote: image counts per split and their bytes."""

    root: Path
    num_classes: int
    counts: dict[str, int]
    total_bytes: int


def wnid_of(label: int) -> str:
    """The synthetic WNID of class ``label`` (sorted order is label order)."""
    return f"n{label + 1:08d}"


def photo_path(out: Path, split: str, position: int, num_classes: int) -> Path:
    """Where :func:`write_photo_folder` puts image ``position`` of ``split``.

    Positions go round the classes (label ``position % num_classes``), so the
    first ``n`` positions of a split are an ``n``-image folder of their own.
    """
    label, number = position % num_classes, position // num_classes
    wnid = wnid_of(label)
    name = f"{wnid}_{number}" if split == "train" else f"ILSVRC2012_val_{position + 1:08d}"
    return Path(out) / split / wnid / f"{name}.JPEG"


def _write_photo(job: tuple[Path, int, int, str, int]) -> int:
    path, label, seed, split, position = job
    data = photo_jpeg(label, _rng(seed, split, position))
    path.write_bytes(data)
    return len(data)


def write_photo_folder(
    out: Path,
    num_classes: int = 8,
    train_per_class: int = 40,
    val_per_class: int = 10,
    seed: int = 0,
    workers: int = 1,
) -> PhotoFolder:
    """An ImageFolder tree of real photographs: ``out/train/<wnid>/<wnid>_<i>.JPEG`` and
    ``out/val/<wnid>/ILSVRC2012_val_<n>.JPEG`` (the folder layout build-shards reads).

    Class ``label`` is cut from photograph ``label % len(PHOTO_FILES)``, so up to
    ten classes are told apart by content; val images are other windows of
    the same photographs (held out, as ImageNet's val images are other
    pictures of the same classes). ``workers`` processes share the work
    (benchmark corpora of thousands of images); the bytes are the same.
    """
    if num_classes > len(PHOTO_FILES):
        raise UserError(
            f"at most {len(PHOTO_FILES)} classes of real photographs, not {num_classes}"
        )
    out = Path(out)
    counts = {}
    jobs = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for position in range(num_classes * per_class):
            path = photo_path(out, split, position, num_classes)
            jobs.append((path, position % num_classes, seed, split, position))
        counts[split] = num_classes * per_class
    for directory in sorted({job[0].parent for job in jobs}):
        directory.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            total = sum(pool.map(_write_photo, jobs, chunksize=32))
    else:
        total = sum(map(_write_photo, jobs))
    return PhotoFolder(out, num_classes, counts, total)
