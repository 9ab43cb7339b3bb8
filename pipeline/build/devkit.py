"""Class metadata and validation labels from the ILSVRC devkit and Kaggle's CSVs.

Pure parsers of bytes and text, plus one loader (``load_devkit``) at the edge
that reads them from ``ILSVRC2012_devkit_t12.tar.gz`` or its extracted folder.

The trap this module exists for: the devkit's ILSVRC2012_IDs (1..1000) are
NOT the sorted-wnid order our labels use. The validation ground truth is a
list of IDs, which must go through ``meta.mat`` (leaf synsets only) to
become wnids; only then are wnids turned into labels, by the caller.
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.errors import UserError

DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"
META_NAME = "data/meta.mat"
GROUND_TRUTH_NAME = "data/ILSVRC2012_validation_ground_truth.txt"


@dataclass(frozen=True)
class Synset:
    """A leaf synset of meta.mat: one of the classes."""

    ilsvrc_id: int
    wnid: str
    words: str


@dataclass(frozen=True)
class Devkit:
    """What the devkit says: the leaf synsets by ILSVRC2012_ID, and the val
    ground truth as IDs for the val files in sorted name order (empty if the
    devkit carries none)."""

    synsets: dict[int, Synset]
    ground_truth: tuple[int, ...]

    def names(self) -> dict[str, str]:
        """wnid -> human-readable words."""
        return {synset.wnid: synset.words for synset in self.synsets.values()}

    def val_wnids(self) -> list[str]:
        """The ground truth as wnids, in the same order."""
        wnids = []
        for line_number, ilsvrc_id in enumerate(self.ground_truth, start=1):
            synset = self.synsets.get(ilsvrc_id)
            if synset is None:
                raise UserError(
                    f"devkit ground truth line {line_number}: ILSVRC2012_ID {ilsvrc_id} "
                    "is not a leaf synset of meta.mat"
                )
            wnids.append(synset.wnid)
        return wnids


def parse_meta_mat(data: bytes) -> dict[int, Synset]:
    """The leaf synsets (``num_children == 0``) of a devkit ``meta.mat``, by ID.

    The 1860 synsets also include the WordNet ancestors of the 1000 classes;
    those have children and are not classes, so they are left out.
    """
    from scipy.io import loadmat

    try:
        contents = loadmat(io.BytesIO(data), squeeze_me=True)
        records = np.atleast_1d(contents["synsets"])
        fields = records.dtype.names or ()
    except Exception as error:  # scipy raises many kinds on malformed files
        raise UserError(f"meta.mat is not a readable devkit meta file ({error})") from None
    needed = ("ILSVRC2012_ID", "WNID", "words", "num_children")
    missing = [name for name in needed if name not in fields]
    if missing:
        raise UserError(f"meta.mat synsets lack the fields {', '.join(missing)}")
    synsets: dict[int, Synset] = {}
    for record in records:
        if int(_scalar(record["num_children"])) != 0:
            continue
        ilsvrc_id = int(_scalar(record["ILSVRC2012_ID"]))
        wnid = str(_scalar(record["WNID"]))
        if ilsvrc_id in synsets:
            raise UserError(f"meta.mat lists ILSVRC2012_ID {ilsvrc_id} twice")
        synsets[ilsvrc_id] = Synset(ilsvrc_id, wnid, str(_scalar(record["words"])))
    wnids = [synset.wnid for synset in synsets.values()]
    if len(set(wnids)) != len(wnids):
        raise UserError("meta.mat lists a leaf wnid twice")
    return synsets


def _scalar(value):
    """Unwrap the 0-d and 1-element arrays loadmat wraps values in."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            return "" if value.size == 0 else value
        value = value.reshape(-1)[0]
    return value


def parse_ground_truth(text: str) -> tuple[int, ...]:
    """One 1-based ILSVRC2012_ID per line (blank lines at the end allowed)."""
    ids = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise UserError(
                f"validation ground truth line {line_number}: {line[:40]!r} is not an ILSVRC2012_ID"
            ) from None
    return tuple(ids)


def parse_synset_mapping(text: str) -> dict[str, str]:
    """Kaggle's ``LOC_synset_mapping.txt``: ``<wnid> <names>`` per line -> {wnid: names}."""
    names: dict[str, str] = {}
    for line in text.splitlines():
        wnid, _, words = line.strip().partition(" ")
        if wnid:
            names[wnid] = words.strip()
    return names


def parse_val_solution(text: str) -> dict[str, str]:
    """Kaggle's ``LOC_val_solution.csv`` -> {ImageId: wnid}.

    The wnid is the first token of PredictionString (the rest are boxes,
    possibly more than one, all of the same class). Rows come in any order.
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [cell.strip() for cell in header[:2]] != ["ImageId", "PredictionString"]:
        raise UserError("LOC_val_solution.csv: expected the header 'ImageId,PredictionString'")
    labels: dict[str, str] = {}
    for line_number, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        image_id = row[0].strip()
        tokens = row[1].split() if len(row) > 1 else []
        if not image_id or not tokens:
            raise UserError(f"LOC_val_solution.csv line {line_number}: no ImageId or no wnid")
        if labels.get(image_id, tokens[0]) != tokens[0]:
            raise UserError(f"LOC_val_solution.csv: {image_id} has two different labels")
        labels[image_id] = tokens[0]
    return labels


def find_devkit(src: Path) -> Path | None:
    """The devkit archive or extracted folder under ``src``, if any."""
    for candidate in (src / DEVKIT_ARCHIVE, src / DEVKIT_FOLDER):
        if candidate.exists():
            return candidate
    return None


def load_devkit(path: Path) -> Devkit:
    """Read meta.mat and the val ground truth from the devkit archive or folder.

    The archive is read in memory (it is 2.5 MB); nothing is extracted.
    """
    path = Path(path)
    if path.is_dir():
        files = {name: path / name for name in (META_NAME, GROUND_TRUTH_NAME)}
        meta = files[META_NAME].read_bytes() if files[META_NAME].is_file() else None
        truth_path = files[GROUND_TRUTH_NAME]
        truth = truth_path.read_bytes() if truth_path.is_file() else None
    else:
        meta, truth = _read_devkit_archive(path)
    if meta is None:
        raise UserError(f"{path}: no {META_NAME} in the devkit")
    ground_truth = parse_ground_truth(truth.decode("ascii", "replace")) if truth else ()
    return Devkit(synsets=parse_meta_mat(meta), ground_truth=ground_truth)


def _read_devkit_archive(path: Path) -> tuple[bytes | None, bytes | None]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                # Only regular files are read, and only into memory.
                if not member.isfile():
                    continue
                for wanted in (META_NAME, GROUND_TRUTH_NAME):
                    if member.name == wanted or member.name.endswith("/" + wanted):
                        handle = archive.extractfile(member)
                        found[wanted] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"{path}: cannot read the devkit archive ({error})") from None
    return found.get(META_NAME), found.get(GROUND_TRUTH_NAME)
