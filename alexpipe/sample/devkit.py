"""The ILSVRC2012 devkit: meta.mat, the val ground truth and their tar.gz.

Like the real ``meta.mat``, the synsets hold the leaf classes with IDs 1..C in
an order that is NOT the sorted-wnid order, followed by non-leaf synsets
(num_children > 0, IDs > C) that a reader must skip. The ground truth is one
ILSVRC2012_ID per line, for the val files in sorted name order; the only way
from ID to wnid is through meta.mat, as with the real files.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.io

from alexpipe.sample.archives import TAR_FORMAT, add_directory, add_file, gzip_bytes
from alexpipe.sample.plan import NOUNS, WNID_RANGE, SampleClass, SampleItem, seeded_order

DEVKIT_ROOT = "ILSVRC2012_devkit_t12"
META_PATH = f"{DEVKIT_ROOT}/data/meta.mat"
GROUND_TRUTH_PATH = f"{DEVKIT_ROOT}/data/ILSVRC2012_validation_ground_truth.txt"
# The real file's field order; torchvision reads fields by position.
SYNSET_FIELDS = (
    "ILSVRC2012_ID", "WNID", "words", "gloss",
    "num_children", "children", "wordnet_height", "num_train_images",
)  # fmt: skip
# savemat writes the current time into the 116-byte text header; a fixed text
# keeps meta.mat byte-identical across runs.
MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Tue Jun  5 00:00:00 2012"
LEAVES_PER_GROUP = 4


@dataclass(frozen=True)
class Synset:
    """One row of meta.mat's ``synsets``."""

    ilsvrc_id: int
    wnid: str
    words: str
    gloss: str
    children: tuple[int, ...]
    wordnet_height: int
    num_train_images: int


def leaf_ids(classes: Sequence[SampleClass], seed: int) -> dict[str, int]:
    """wnid -> ILSVRC2012_ID (1..C), a seeded permutation of label order that
    is never the sorted-wnid order itself (when there are two classes or more)."""
    order = seeded_order(len(classes), seed, 0x1D5)
    return {sample_class.wnid: int(order[sample_class.label]) + 1 for sample_class in classes}


def build_synsets(
    classes: Sequence[SampleClass], ids: dict[str, int], seed: int, train_counts: dict[str, int]
) -> list[Synset]:
    """All synsets in ID order: the leaves (``ids``: their :func:`leaf_ids`), then
    groups of leaves, then a root."""
    leaves = sorted(
        (
            Synset(ids[c.wnid], c.wnid, c.words, c.gloss, (), 0, train_counts.get(c.wnid, 0))
            for c in classes
        ),
        key=lambda synset: synset.ilsvrc_id,
    )
    # Non-leaf wnids sit below the leaves' range, like n00001740 'entity'.
    rng = np.random.default_rng([seed, 0x9E0])
    parent_count = -(-len(leaves) // LEAVES_PER_GROUP) + 1
    parent_numbers = rng.choice(WNID_RANGE[0], size=parent_count, replace=False)
    parent_wnids = [f"n{int(number):08d}" for number in parent_numbers]
    parents = []
    for start in range(0, len(leaves), LEAVES_PER_GROUP):
        ilsvrc_id = len(leaves) + len(parents) + 1
        noun = NOUNS[ilsvrc_id % len(NOUNS)]
        group = leaves[start : start + LEAVES_PER_GROUP]
        parents.append(
            Synset(
                ilsvrc_id=ilsvrc_id,
                wnid=parent_wnids[len(parents)],
                words=f"{noun} family",
                gloss=f"any of the {noun}-like animals of this synthetic sample",
                children=tuple(child.ilsvrc_id for child in group),
                wordnet_height=1,
                num_train_images=0,
            )
        )
    root = Synset(
        ilsvrc_id=len(leaves) + len(parents) + 1,
        wnid=parent_wnids[-1],
        words="entity",
        gloss="that which is perceived or known or inferred to have its own distinct existence",
        children=tuple(parent.ilsvrc_id for parent in parents),
        wordnet_height=2,
        num_train_images=0,
    )
    return leaves + parents + [root]


def meta_mat_bytes(synsets: Sequence[Synset]) -> bytes:
    """meta.mat with a ``synsets`` struct array (N x 1) of the real fields."""
    records = np.empty((len(synsets), 1), dtype=[(field, object) for field in SYNSET_FIELDS])
    for row, synset in enumerate(synsets):
        records[row, 0] = (
            np.uint16(synset.ilsvrc_id),
            synset.wnid,
            synset.words,
            synset.gloss,
            np.uint16(len(synset.children)),
            np.array(synset.children, dtype=np.uint16),
            np.uint16(synset.wordnet_height),
            np.uint16(synset.num_train_images),
        )
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": records}, format="5")
    data = bytearray(buffer.getvalue())
    data[:116] = MAT_HEADER_TEXT.ljust(116, b" ")
    return bytes(data)


def ground_truth_text(val_items: Sequence[SampleItem], ids: dict[str, int]) -> str:
    """One ILSVRC2012_ID per line, for the val files in sorted name order."""
    ordered = sorted(val_items, key=lambda item: item.key)
    return "".join(f"{ids[item.wnid]}\n" for item in ordered)


def devkit_archive_bytes(meta_mat: bytes, ground_truth: str) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz holding data/meta.mat and the ground truth."""
    readme = (
        "Synthetic ILSVRC2012 devkit written by `alexpipe sample`.\n"
        "data/meta.mat: synsets (leaves have ILSVRC2012_ID 1..C and num_children 0).\n"
        "data/ILSVRC2012_validation_ground_truth.txt: one ILSVRC2012_ID per val image,\n"
        "in sorted file-name order.\n"
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=TAR_FORMAT) as archive:
        add_directory(archive, f"{DEVKIT_ROOT}/")
        add_file(archive, f"{DEVKIT_ROOT}/readme.txt", readme.encode())
        add_directory(archive, f"{DEVKIT_ROOT}/data/")
        add_file(archive, GROUND_TRUTH_PATH, ground_truth.encode())
        add_file(archive, META_PATH, meta_mat)
    return gzip_bytes(buffer.getvalue())
