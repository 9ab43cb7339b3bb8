"""What the inputs are: one sorted list of (split, key, wnid, label, how to read) per split.

Three layouts of the same ILSVRC-2012 data are understood (docs/format.md):

- ``folder``: ``SRC/{train,val}/<wnid>/*.JPEG`` (torchvision ImageFolder);
- ``tars``: the official ``ILSVRC2012_img_{train,val}.tar`` read in place
  (by byte offsets, see :mod:`pipeline.build.tarscan`) plus the devkit;
- ``kaggle``: ``SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/}`` plus
  ``LOC_synset_mapping.txt`` and ``LOC_val_solution.csv``.

Whatever the layout, the classes are the sorted train wnids, a label is the
index of a wnid among them, a key is the file's stem, and items are sorted by
key, so the same images in any layout give the same listing. Inputs that
cannot be used (unsafe tar members, val images of unknown classes or without
a label, names that cannot be keys) are listed in ``rejected`` with a reason;
input that is broken as a whole raises :class:`UserError`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from pipeline.build.devkit import (
    find_devkit,
    load_devkit,
    parse_synset_mapping,
    parse_val_solution,
)
from pipeline.build.tarscan import TarMember, rejection_reason, scan_tar
from shards.errors import UserError
from shards.manifest import SPLITS, Layout
from shards.writer import is_valid_key

LAYOUTS = tuple(layout.value for layout in Layout if layout is not Layout.AUTO)
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
KAGGLE_ROOT = PurePosixPath("ILSVRC/Data/CLS-LOC")
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"

# What auto-detection looks for: the train part, which every build needs
# because it defines the classes (even a val-only build needs the labels).
_MARKERS = {
    "kaggle": str(KAGGLE_ROOT / "train") + "/",
    "tars": TRAIN_TAR,
    "folder": "train/",
}


class TarSlice(NamedTuple):
    """Where an image lies inside a tar file: ``size`` bytes at ``offset``."""

    path: str
    offset: int
    size: int


# A plain file path (folder, kaggle) or a slice of a tar (tars).
ByteLocation = str | TarSlice


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image. ``source`` is what users see (path relative to SRC,
    or ``"<tar>:<member>"``); ``location`` is how ``read_bytes`` gets it."""

    split: str
    key: str
    wnid: str
    label: int
    source: str
    location: ByteLocation


@dataclass(frozen=True)
class SourceListing:
    """Everything ``discover`` found.

    ``classes`` are the sorted train wnids (label = position), ``class_names``
    their words where the input names them. ``items[split]`` is sorted by key.
    ``rejected`` holds ``{"split", "source", "reason"}`` rows for inputs that
    will not reach a shard; ``notes`` are warnings worth printing.
    """

    layout: str
    classes: tuple[str, ...]
    class_names: dict[str, str]
    items: dict[str, tuple[SourceItem, ...]]
    rejected: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass
class _Found:
    """A layout's raw findings for one split, before keys and labels are checked."""

    # (key, wnid, source, location); wnid None = no label found
    candidates: list[tuple[str, str | None, str, ByteLocation]] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def discover(src, layout: str = "auto", splits: Iterable[str] = SPLITS) -> SourceListing:
    """List the inputs under ``src`` for ``splits`` (see the module docstring).

    Reads only directory entries, tar headers and the label files, never the
    images, so listing ImageNet takes seconds to minutes, not hours.
    """
    # Absolute, so locations stay valid in workers with another working directory.
    root = Path(src).absolute()
    splits = tuple(splits)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise UserError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    layout = resolve_layout(src, layout)
    lister = {"folder": _list_folder, "tars": _list_tars, "kaggle": _list_kaggle}[layout]
    classes, class_names, found = lister(root, splits)

    class_index = {wnid: index for index, wnid in enumerate(classes)}
    items: dict[str, tuple[SourceItem, ...]] = {}
    rejected: list[dict] = []
    notes: list[str] = []
    for split in splits:
        split_items, split_rejected = _assemble(split, found[split], class_index)
        items[split] = split_items
        rejected.extend(found[split].rejected + split_rejected)
        notes.extend(found[split].notes)
    rejected.sort(key=lambda row: (SPLITS.index(row["split"]), row["source"]))
    return SourceListing(
        layout=layout,
        classes=tuple(classes),
        class_names={wnid: class_names.get(wnid, "") for wnid in classes},
        items=items,
        rejected=tuple(rejected),
        notes=tuple(notes),
    )


def resolve_layout(src, layout: str = "auto") -> str:
    """The layout of ``src`` (``layout``, or detected from marker files when
    ``auto``; nothing is listed), or a UserError for a missing or odd ``src``."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"--src {src} does not exist")
    if not src.is_dir():
        raise UserError(f"--src {src} is not a directory")
    if layout == "auto":
        return detect_layout(src.absolute())
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    return layout


def detect_layout(root: Path) -> str:
    """The one layout whose train part exists under ``root``; UserError otherwise."""
    present = [name for name, marker in _MARKERS.items() if (root / marker.rstrip("/")).exists()]
    if not present:
        looked_for = ", ".join(f"{marker} ({name})" for name, marker in _MARKERS.items())
        raise UserError(f"cannot detect the input layout of {root}: looked for {looked_for}")
    if len(present) > 1:
        raise UserError(
            f"{root} holds several layouts ({', '.join(present)}); choose one with --layout"
        )
    return present[0]


def read_bytes(item: SourceItem) -> bytes:
    """The raw bytes of one input (an ``OSError`` if they cannot be read)."""
    location = item.location
    if isinstance(location, tuple):
        path, offset, size = location
        descriptor = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(descriptor, size, offset)
        finally:
            os.close(descriptor)
        if len(data) != size:
            raise OSError(f"{path} is shorter than when it was listed (changed since?)")
        return data
    with open(location, "rb") as handle:
        return handle.read()


# -- assembling a split: keys, labels, order --------------------------------------


def _assemble(split: str, found: _Found, class_index: dict[str, int]):
    items: list[SourceItem] = []
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    for key, wnid, source, location in found.candidates:
        if wnid is None:
            continue  # the layout already rejected it, with its reason
        if not is_valid_key(key):
            # The shard writer's rule (WebDataset splits a member name at the
            # first dot, so such a key would not come back from a shard as itself).
            rejected.append(rejection(split, source, f"unsupported file name: key {key!r}"))
            continue
        if key in seen:
            raise UserError(f"{split}: two inputs have the key {key!r}: {seen[key]} and {source}")
        seen[key] = source
        label = class_index.get(wnid)
        if label is None:
            reason = f"unknown class: {wnid} is not among the train classes"
            rejected.append(rejection(split, source, reason))
            continue
        items.append(SourceItem(split, key, wnid, label, source, location))
    items.sort(key=lambda item: item.key)
    return tuple(items), rejected


def rejection(split: str, source: str, reason: str) -> dict:
    """One row of rejected.jsonl."""
    return {"split": split, "source": source, "reason": reason}


def _key_of(name: str) -> str:
    """The file's stem: ``a/n01_1.JPEG`` -> ``n01_1`` (string ops: pathlib is slow at 1.3 M)."""
    base = name.rpartition("/")[2]
    dot = base.rfind(".")
    return base[:dot] if dot > 0 else base


# -- folder and kaggle: class folders on disk --------------------------------------


def _require_dir(path: Path, layout: str, split: str) -> None:
    if not path.is_dir():
        raise UserError(f"{layout} layout: {path} is not a directory (needed for split {split})")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, recursively, in sorted order."""
    files = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        files.extend(Path(directory) / name for name in sorted(names) if not name.startswith("."))
    return files


def _list_class_folders(root: Path, split: str, split_dir: Path, found: _Found) -> list[str]:
    """Add every file under ``split_dir/<wnid>/`` to ``found``; return the wnids."""
    entries = sorted(
        (entry for entry in os.scandir(split_dir) if not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    wnids = [entry.name for entry in entries if entry.is_dir()]
    for entry in entries:
        if not entry.is_dir():
            source = Path(entry.path).relative_to(root).as_posix()
            found.rejected.append(rejection(split, source, "not inside a <wnid>/ class folder"))
    for wnid in wnids:
        wnid = sys.intern(wnid)
        for path in _files_under(split_dir / wnid):
            source = path.relative_to(root).as_posix()
            found.candidates.append((_key_of(path.name), wnid, source, str(path)))
    return wnids


def _list_train(root: Path, base: Path, layout: str, found: dict[str, _Found]) -> list[str]:
    """The classes (the folders of ``base/train``), listing the train files if asked for."""
    _require_dir(base / "train", layout, "train")
    if "train" in found:
        return _list_class_folders(root, "train", base / "train", found["train"])
    return _class_folders(base / "train")


def _list_folder(root: Path, splits: tuple[str, ...]):
    found = {split: _Found() for split in splits}
    classes = _list_train(root, root, "folder", found)
    if "val" in splits:
        _require_dir(root / "val", "folder", "val")
        _list_class_folders(root, "val", root / "val", found["val"])
    return classes, _optional_names(root), found


def _optional_names(root: Path) -> dict[str, str]:
    """Class words from a synset mapping or devkit lying in SRC, if any."""
    if (root / SYNSET_MAPPING).is_file():
        return _synset_mapping_names(root)
    devkit = find_devkit(root)
    return load_devkit(devkit).names() if devkit else {}


def _synset_mapping_names(root: Path) -> dict[str, str]:
    """Class words from ``SRC/LOC_synset_mapping.txt``, or none without one."""
    if not (root / SYNSET_MAPPING).is_file():
        return {}
    return parse_synset_mapping((root / SYNSET_MAPPING).read_text(errors="replace"))


def _list_kaggle(root: Path, splits: tuple[str, ...]):
    found = {split: _Found() for split in splits}
    base = root / KAGGLE_ROOT
    classes = _list_train(root, base, "kaggle", found)
    if "val" in splits:
        _require_dir(base / "val", "kaggle", "val")
        solution = root / VAL_SOLUTION
        if not solution.is_file():
            raise UserError(f"kaggle layout: {solution} not found (needed for the val labels)")
        labels = parse_val_solution(solution.read_text(errors="replace"))
        _label_kaggle_val(root, base / "val", labels, found["val"])
    return classes, _synset_mapping_names(root), found


def _label_kaggle_val(root: Path, val_dir: Path, labels: dict[str, str], found: _Found) -> None:
    used = set()
    for path in _files_under(val_dir):
        key = _key_of(path.name)
        source = path.relative_to(root).as_posix()
        wnid = labels.get(key)
        if wnid is None:
            found.rejected.append(rejection("val", source, f"no label in {VAL_SOLUTION}"))
        else:
            used.add(key)
            wnid = sys.intern(wnid)
        found.candidates.append((key, wnid, source, str(path)))
    unused = sorted(set(labels) - used)
    if unused:
        found.notes.append(
            f"{VAL_SOLUTION}: {len(unused)} label row(s) have no image file (e.g. {unused[0]})"
        )


# -- tars: the official archives, read in place -----------------------------------------


def _list_tars(root: Path, splits: tuple[str, ...]):
    found = {split: _Found() for split in splits}
    train_tar = root / TRAIN_TAR
    if not train_tar.is_file():
        raise UserError(f"tars layout: {train_tar} not found (it defines the classes)")
    devkit_path = find_devkit(root)
    devkit = load_devkit(devkit_path) if devkit_path else None
    classes = _list_train_tar(train_tar, found.get("train"), list_images="train" in splits)
    if "val" in splits:
        val_tar = root / VAL_TAR
        if not val_tar.is_file():
            raise UserError(f"tars layout: {val_tar} not found (needed for split val)")
        if devkit is None or not devkit.ground_truth:
            raise UserError(
                f"tars layout: the val labels need {root / 'ILSVRC2012_devkit_t12.tar.gz'} "
                "with data/ILSVRC2012_validation_ground_truth.txt"
            )
        _list_val_tar(val_tar, devkit.val_wnids(), found["val"])
    return classes, devkit.names() if devkit else {}, found


def _safe_members(tar_path: Path, split: str, prefix: str, found: _Found, start=0, end=None):
    """The safe regular files of a tar; unsafe members go to ``found.rejected``."""
    for member in scan_tar(tar_path, start, end):
        if member.kind == "directory":
            continue  # a folder entry is not an input
        reason = rejection_reason(member)
        if reason is not None:
            if found is not None:
                found.rejected.append(rejection(split, f"{prefix}{member.name}", reason))
            continue
        yield member


def _list_train_tar(train_tar: Path, found: _Found | None, list_images: bool) -> list[str]:
    """Scan the outer tar (and, if asked, every inner ``<wnid>.tar``); return the wnids."""
    path = str(train_tar)
    wnids: dict[str, TarMember] = {}
    for member in _safe_members(train_tar, "train", f"{TRAIN_TAR}:", found):
        name = PurePosixPath(member.name)
        if name.suffix != ".tar":
            if found is not None:
                reason = "not a class tar (expected <wnid>.tar)"
                found.rejected.append(rejection("train", f"{TRAIN_TAR}:{member.name}", reason))
            continue
        wnid = sys.intern(name.stem)
        if wnid in wnids:
            raise UserError(f"{train_tar}: two class tars for {wnid}")
        wnids[wnid] = member
    if list_images:
        for wnid, class_tar in wnids.items():
            # An inner member's data offset is already absolute in the outer
            # file because the inner tar is scanned where it lies.
            prefix = f"{TRAIN_TAR}:{class_tar.name}/"
            end = class_tar.offset + class_tar.size
            for member in _safe_members(train_tar, "train", prefix, found, class_tar.offset, end):
                location = TarSlice(path, member.offset, member.size)
                found.candidates.append(
                    (_key_of(member.name), wnid, prefix + member.name, location)
                )
    return sorted(wnids)


def _list_val_tar(val_tar: Path, wnids: list[str], found: _Found) -> None:
    """Label the val images positionally: ground-truth line i is the i-th file by name."""
    members = sorted(_safe_members(val_tar, "val", f"{VAL_TAR}:", found), key=lambda m: m.name)
    if len(members) != len(wnids):
        raise UserError(
            f"{val_tar} holds {len(members)} images but the devkit ground truth has "
            f"{len(wnids)} labels; they must match one to one (in sorted name order)"
        )
    path = str(val_tar)
    for member, wnid in zip(members, wnids, strict=True):
        location = TarSlice(path, member.offset, member.size)
        found.candidates.append(
            (_key_of(member.name), sys.intern(wnid), f"{VAL_TAR}:{member.name}", location)
        )
