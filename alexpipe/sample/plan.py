"""What a sample dataset holds: classes, file keys and per-image settings.

Pure and seeded: :func:`plan_sample` turns a :class:`SampleConfig` into a
:class:`SamplePlan` without touching the disk. Every image's settings are drawn
from a generator keyed by (seed, split, key) alone, so an image does not change
with the layout, and turning ``odd_files`` on adds files without changing the
others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from alexpipe.sample.images import ImageSpec, class_style
from alexpipe.sample.oddities import ODD_KINDS, VAL_KINDS, stored_size
from shards.errors import UserError

LAYOUTS = ("folder", "tars", "kaggle")
SPLITS = ("train", "val")
MAX_CLASSES = 1000
MAX_TRAIN_PER_CLASS = 10_000
MAX_VAL_PER_CLASS = 1_000
# Train file numbers (the n in <wnid>_<n>.JPEG) are drawn from 1..this, like
# the real set's gappy numbering.
MAX_TRAIN_NUMBER = 19_999
# Real leaf wnids run from n01440764 to n15075141.
WNID_RANGE = (1_440_764, 15_075_141)
# Every 32nd image of a class (from the 6th) is stored as grayscale.
GRAYSCALE_EVERY, GRAYSCALE_FIRST = 32, 5
ADJECTIVES = (
    "amber", "ashen", "banded", "blue", "bristled", "copper", "crested", "dappled",
    "dusky", "fan-tailed", "freckled", "giant", "gilded", "great", "horned", "hooded",
    "lesser", "marbled", "masked", "mottled", "northern", "painted", "pale", "red",
    "ringed", "royal", "silver", "speckled", "spotted", "striped", "tufted", "velvet",
)  # fmt: skip
NOUNS = (
    "anemone", "beetle", "bittern", "carp", "cicada", "cowrie", "crab", "dace",
    "finch", "frogfish", "gecko", "goby", "grebe", "heron", "ibis", "kestrel",
    "lemur", "limpet", "loach", "marten", "moth", "newt", "owl", "plover",
    "puffin", "salamander", "shrike", "skink", "stoat", "tanager", "urchin", "wren",
)  # fmt: skip


@dataclass(frozen=True)
class SampleConfig:
    """What ``alexpipe sample`` writes. ``image_scale`` shrinks every image
    (tests use 0.25); at 1.0 shorter sides are 150..1200 px like the real set."""

    out: Path
    layout: str = "folder"
    classes: int = 10
    train_per_class: int = 40
    val_per_class: int = 10
    odd_files: bool = False
    seed: int = 0
    image_scale: float = 1.0


@dataclass(frozen=True)
class SampleClass:
    """One leaf synset: ``label`` is its index in the sorted wnids."""

    label: int
    wnid: str
    words: str
    gloss: str


@dataclass(frozen=True)
class SampleItem:
    """One file of the sample. ``kind`` is "normal" or one of ODD_KINDS."""

    split: str
    key: str
    wnid: str
    label: int
    kind: str
    spec: ImageSpec

    @property
    def filename(self) -> str:
        return f"{self.key}.JPEG"

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) as stored (before EXIF orientation); None if empty."""
        return stored_size(self.kind, self.spec.width, self.spec.height)

    @property
    def mode(self) -> str | None:
        """PIL mode of the stored file; None if nothing can be decoded."""
        if self.kind == "normal":
            return "L" if self.spec.grayscale else "RGB"
        return ODD_KINDS[self.kind]


@dataclass(frozen=True)
class SamplePlan:
    """Classes in label order and items sorted by (split, key)."""

    config: SampleConfig
    classes: tuple[SampleClass, ...]
    items: tuple[SampleItem, ...]

    def split_items(self, split: str) -> tuple[SampleItem, ...]:
        return tuple(item for item in self.items if item.split == split)


def seeded_order(size: int, *seed_words: int) -> np.ndarray:
    """A permutation of ``range(size)`` seeded by ``seed_words`` that is never
    the identity (when ``size`` > 1: it is then reversed), so that a reader
    relying on sorted order is caught."""
    order = np.random.default_rng(list(seed_words)).permutation(size)
    if size > 1 and np.array_equal(order, np.arange(size)):
        order = order[::-1]
    return order


def check_config(config: SampleConfig) -> None:
    """Raise UserError, in one line, for a config that cannot be written."""
    if config.layout not in LAYOUTS:
        raise UserError(f"unknown layout {config.layout!r}; choose one of {', '.join(LAYOUTS)}")
    limits = (
        ("--classes", config.classes, MAX_CLASSES),
        ("--train-per-class", config.train_per_class, MAX_TRAIN_PER_CLASS),
        ("--val-per-class", config.val_per_class, MAX_VAL_PER_CLASS),
    )
    for option, value, maximum in limits:
        if not 1 <= value <= maximum:
            raise UserError(f"{option} must be between 1 and {maximum}, got {value}")
    if config.seed < 0:
        raise UserError(f"--seed must be >= 0, got {config.seed}")
    if not 0 < config.image_scale <= 4:
        raise UserError(f"image scale must be in (0, 4], got {config.image_scale}")


def _item_rng(seed: int, split: str, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"alexpipe-sample/{seed}/{split}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def image_spec(config: SampleConfig, split: str, key: str, label: int, kind: str) -> ImageSpec:
    """Size, JPEG settings and content seed of one image, from its key alone."""
    rng = _item_rng(config.seed, split, key)
    draw = rng.random()
    if kind != "normal":  # odd files stay modest: some are stored as PNG
        shorter = int(rng.integers(200, 501))
    elif draw < 0.06:
        shorter = int(rng.integers(150, 250))
    elif draw < 0.86:  # most real photos are about 500x375
        shorter = int(rng.integers(250, 501))
    else:
        shorter = int(rng.integers(501, 1201))
    # width / height; 3:4 is portrait. Weights roughly like ImageNet's.
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2.0], p=[0.5, 0.15, 0.1, 0.15, 0.1]))
    shorter = max(16, round(shorter * config.image_scale))
    longer = round(shorter * max(aspect, 1 / aspect))
    width, height = (longer, shorter) if aspect >= 1 else (shorter, longer)
    return ImageSpec(
        width=width,
        height=height,
        quality=int(rng.integers(70, 96)),
        subsampling=0 if rng.random() < 0.15 else 2,
        grayscale=False,
        content_seed=int(rng.integers(2**63)),
        style=class_style(label, config.classes, config.seed),
    )


def _item(config, split, key, sample_class, kind="normal", grayscale=False) -> SampleItem:
    spec = image_spec(config, split, key, sample_class.label, kind)
    if grayscale:
        spec = replace(spec, grayscale=True)
    return SampleItem(split, key, sample_class.wnid, sample_class.label, kind, spec)


def _is_grayscale(index_in_class: int) -> bool:
    return index_in_class % GRAYSCALE_EVERY == GRAYSCALE_FIRST


def _make_classes(config: SampleConfig) -> list[SampleClass]:
    """Classes in generation order (which is not label order)."""
    rng = np.random.default_rng([config.seed, 0xC1A5])
    low, high = WNID_RANGE
    numbers = rng.choice(high - low, size=config.classes, replace=False) + low
    names = rng.choice(len(ADJECTIVES) * len(NOUNS), size=config.classes, replace=False)
    wnids = [f"n{number:08d}" for number in numbers]
    label_of = {wnid: label for label, wnid in enumerate(sorted(wnids))}
    classes = []
    for wnid, name in zip(wnids, names, strict=True):
        adjective, noun = ADJECTIVES[name // len(NOUNS)], NOUNS[name % len(NOUNS)]
        words = f"{adjective} {noun}, {noun.capitalize()} {adjective.replace('-', '')}us"
        gloss = f"a synthetic {noun} drawn as {adjective} shapes over a striped ground"
        classes.append(SampleClass(label_of[wnid], wnid, words, gloss))
    return classes


def plan_sample(config: SampleConfig) -> SamplePlan:
    """Everything a sample will contain, without rendering or writing it."""
    check_config(config)
    generation_order = _make_classes(config)
    classes = sorted(generation_order, key=lambda sample_class: sample_class.label)
    items: list[SampleItem] = []

    used_numbers: dict[str, set[int]] = {}
    for index, sample_class in enumerate(generation_order):
        rng = np.random.default_rng([config.seed, 0x7A1, index])
        drawn = rng.choice(MAX_TRAIN_NUMBER, size=config.train_per_class, replace=False) + 1
        numbers = sorted(int(number) for number in drawn)
        used_numbers[sample_class.wnid] = set(numbers)
        for position, number in enumerate(numbers):
            key = f"{sample_class.wnid}_{number}"
            items.append(
                _item(config, "train", key, sample_class, grayscale=_is_grayscale(position))
            )

    # Val numbers 1..N are a seeded permutation over all classes, so classes
    # are interleaved in name order as in the real set.
    total_val = config.classes * config.val_per_class
    positions = np.random.default_rng([config.seed, 0x7A2]).permutation(total_val)
    for sample_class in classes:
        for index in range(config.val_per_class):
            number = int(positions[sample_class.label * config.val_per_class + index]) + 1
            key = f"ILSVRC2012_val_{number:08d}"
            items.append(_item(config, "val", key, sample_class, grayscale=_is_grayscale(index)))

    if config.odd_files:
        items += _odd_items(config, classes, used_numbers, total_val)
    items.sort(key=lambda item: (SPLITS.index(item.split), item.key))
    return SamplePlan(config=config, classes=tuple(classes), items=tuple(items))


def _odd_items(config, classes, used_numbers, total_val) -> list[SampleItem]:
    """One train file of each odd kind (classes round-robin, numbers unused by
    that class) and the val kinds numbered after the normal val images."""
    rng = np.random.default_rng([config.seed, 0x0DD])
    items = []
    for index, kind in enumerate(ODD_KINDS):
        sample_class = classes[index % len(classes)]
        used = used_numbers[sample_class.wnid]
        number = int(rng.integers(1, MAX_TRAIN_NUMBER + 1))
        while number in used:
            number = int(rng.integers(1, MAX_TRAIN_NUMBER + 1))
        used.add(number)
        items.append(_item(config, "train", f"{sample_class.wnid}_{number}", sample_class, kind))
    for index, kind in enumerate(VAL_KINDS):
        sample_class = classes[(index + 1) % len(classes)]
        key = f"ILSVRC2012_val_{total_val + index + 1:08d}"
        items.append(_item(config, "val", key, sample_class, kind))
    return items
