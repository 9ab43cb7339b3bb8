"""Write a :class:`SamplePlan` to disk in one of the three ImageNet layouts
(docs/format.md): ``folder`` (ImageFolder after valprep.sh), ``tars`` (the official
archives) and ``kaggle`` (the Kaggle ILSVRC download).

Each image's bytes depend only on its (split, key), so the three layouts hold
the same pictures; only their arrangement differs. Orders that real readers
must not rely on (val tar members, tar of tars, Kaggle CSV rows) are seeded
shuffles, never name order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from alexpipe.sample.archives import tar_bytes, write_bytes, write_tar
from alexpipe.sample.devkit import (
    build_synsets,
    devkit_archive_bytes,
    ground_truth_text,
    leaf_ids,
    meta_mat_bytes,
)
from alexpipe.sample.images import encode_jpeg, render_image
from alexpipe.sample.oddities import encode_odd
from alexpipe.sample.plan import SampleItem, SamplePlan, seeded_order

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_DATA = Path("ILSVRC/Data/CLS-LOC")
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"

OnImage = Callable[[], object]
# Independent seeded streams for the orders of archive members and CSV rows.
CLASS_TARS_ORDER, VAL_TAR_ORDER, VAL_CSV_ORDER, CLASS_MEMBERS_ORDER = 0, 1, 2, 16


def item_bytes(item: SampleItem) -> bytes:
    """The stored bytes of one sample file (a pure function of the item)."""
    image = render_image(item.spec)
    if item.kind == "normal":
        return encode_jpeg(image, item.spec)
    return encode_odd(image, item.kind, item.spec)


def _rendered(items: Iterable[SampleItem], on_image: OnImage) -> Iterator[tuple[str, bytes]]:
    for item in items:
        data = item_bytes(item)
        on_image()
        yield item.filename, data


def _shuffled(values: Sequence, seed: int, stream: int) -> list:
    """A seeded permutation of ``values`` (given sorted) that is never the
    sorted order itself, so a reader relying on archive order is caught."""
    return [values[index] for index in seeded_order(len(values), seed, 0x5F1, stream)]


def write_folder(plan: SamplePlan, out: Path, on_image: OnImage) -> list[Path]:
    """SRC/train/<wnid>/<key>.JPEG and SRC/val/<wnid>/<key>.JPEG."""
    written = []
    for item in plan.items:
        relative = Path(item.split, item.wnid, item.filename)
        write_bytes(out / relative, item_bytes(item))
        on_image()
        written.append(relative)
    return written


def write_tars(plan: SamplePlan, out: Path, on_image: OnImage) -> list[Path]:
    """The three official archives: a tar of per-class tars for train, a flat
    val tar in shuffled order, and the devkit with meta.mat and ground truth."""
    seed = plan.config.seed
    val = plan.split_items("val")
    train_of: dict[str, list[SampleItem]] = {c.wnid: [] for c in plan.classes}
    for item in plan.split_items("train"):
        train_of[item.wnid].append(item)

    def class_tars() -> Iterator[tuple[str, bytes]]:
        for sample_class in _shuffled(plan.classes, seed, CLASS_TARS_ORDER):
            members = train_of[sample_class.wnid]
            shuffled = _shuffled(members, seed, CLASS_MEMBERS_ORDER + sample_class.label)
            yield f"{sample_class.wnid}.tar", tar_bytes(_rendered(shuffled, on_image))

    out.mkdir(parents=True, exist_ok=True)
    write_tar(out / TRAIN_TAR, class_tars())
    write_tar(out / VAL_TAR, _rendered(_shuffled(val, seed, VAL_TAR_ORDER), on_image))

    train_counts = {wnid: len(members) for wnid, members in train_of.items()}
    ids = leaf_ids(plan.classes, seed)
    meta = meta_mat_bytes(build_synsets(plan.classes, ids, seed, train_counts))
    ground_truth = ground_truth_text(val, ids)
    write_bytes(out / DEVKIT_ARCHIVE, devkit_archive_bytes(meta, ground_truth))
    return [Path(TRAIN_TAR), Path(VAL_TAR), Path(DEVKIT_ARCHIVE)]


def _boxes(item: SampleItem, seed: int) -> str:
    """1-3 plausible bounding boxes inside the image, Kaggle style: the wnid
    then xmin ymin xmax ymax, repeated, with a trailing space."""
    rng = np.random.default_rng([seed, 0xB0C, int(item.key.rsplit("_", 1)[1])])
    width, height = item.spec.width, item.spec.height
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        x0, x1 = sorted(int(value) for value in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(value) for value in rng.integers(0, height, size=2))
        parts.append(f"{item.wnid} {x0} {y0} {max(x1, x0 + 1)} {max(y1, y0 + 1)} ")
    return "".join(parts)


def write_kaggle(plan: SamplePlan, out: Path, on_image: OnImage) -> list[Path]:
    """ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}, the synset mapping sorted by
    wnid, and LOC_val_solution.csv with rows in shuffled order."""
    written = []
    for item in plan.items:
        if item.split == "train":
            relative = KAGGLE_DATA / "train" / item.wnid / item.filename
        else:
            relative = KAGGLE_DATA / "val" / item.filename
        write_bytes(out / relative, item_bytes(item))
        on_image()
        written.append(relative)

    mapping = "".join(f"{c.wnid} {c.words}\n" for c in sorted(plan.classes, key=lambda c: c.wnid))
    write_bytes(out / KAGGLE_SYNSETS, mapping.encode())
    rows = [
        f"{item.key},{_boxes(item, plan.config.seed)}\n"
        for item in _shuffled(plan.split_items("val"), plan.config.seed, VAL_CSV_ORDER)
    ]
    write_bytes(out / KAGGLE_VAL_SOLUTION, ("ImageId,PredictionString\n" + "".join(rows)).encode())
    return written + [Path(KAGGLE_SYNSETS), Path(KAGGLE_VAL_SOLUTION)]


WRITERS: dict[str, Callable[[SamplePlan, Path, OnImage], list[Path]]] = {
    "folder": write_folder,
    "tars": write_tars,
    "kaggle": write_kaggle,
}
