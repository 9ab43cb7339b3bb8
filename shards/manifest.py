"""The shard directory's manifest, typed: :class:`Manifest`, its one parser and its one writer.

``manifest.json`` is written last and atomically by a build, so its presence
means the directory is complete. :func:`write_manifest` is the only code that
writes one and :func:`parse_manifest` the only code that reads one (from the
bytes that :func:`shards.remote.read_manifest` fetches from a directory or a
remote location); ``FORMAT`` is spelled here only. Every way of pointing at
the wrong place or at a damaged file is a one-line :class:`UserError`.

The enums are the vocabulary of the command line (``click.Choice``) and of
the manifest: the splits, and the input layouts a build reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from shards.atomic import dumps_json, write_text_atomic
from shards.errors import UserError
from shards.writer import ShardInfo, shard_info_dict

FORMAT = "alexpipe-shards/1"
MANIFEST_NAME = "manifest.json"
STATS_NAME = "stats.json"
MEAN_NAME = "mean.npy"
MEAN_PNG_NAME = "mean.png"
REJECTED_NAME = "rejected.jsonl"
# File names come from the manifest, which may be remote, and end up in URLs, paths
# and shell commands: only names that can go there unquoted are accepted.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Split(str, Enum):
    """The splits a build writes and a loader reads."""

    TRAIN = "train"
    VAL = "val"


SPLITS = tuple(split.value for split in Split)


class Layout(str, Enum):
    """Input layouts of ``build-shards --layout``; a manifest records the one found, never AUTO."""

    AUTO = "auto"
    FOLDER = "folder"
    TARS = "tars"
    KAGGLE = "kaggle"


@dataclass(frozen=True)
class ClassInfo:
    """One class: its label, WordNet id and name ("" where the input layout gives none)."""

    index: int
    wnid: str
    name: str = ""


@dataclass(frozen=True)
class SplitEntry:
    """One split: its sample count, how many inputs were rejected, and its shards in order."""

    num_samples: int
    num_rejected: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` records. ``config`` holds the build settings that decide the
    bytes, as the build recorded them; ``stats``, ``mean`` and ``rejected`` name files
    beside the manifest (None: not written, e.g. no train split)."""

    config: dict[str, Any]
    classes: tuple[ClassInfo, ...]
    splits: dict[str, SplitEntry]
    stats: str | None = STATS_NAME
    mean: str | None = MEAN_NAME
    rejected: str | None = REJECTED_NAME

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0..num_classes-1)."""
        return len(self.classes)

    def split(self, name: str) -> SplitEntry:
        """The entry of split ``name``; a UserError names the splits there are."""
        try:
            return self.splits[name]
        except KeyError:
            available = ", ".join(sorted(self.splits)) or "none"
            raise UserError(
                f"split {name!r} is not in the shards (available: {available})"
            ) from None

    def has_samples(self, name: str) -> bool:
        """True if split ``name`` is there and not empty."""
        return name in self.splits and self.splits[name].num_samples > 0

    def every_shard(self) -> list[ShardInfo]:
        """The shards of every split, split by split in manifest order."""
        return [info for entry in self.splits.values() for info in entry.shards]

    def as_json(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json``, keys in the order the file has them."""
        return {
            "format": FORMAT,
            "config": self.config,
            "classes": [
                {"index": entry.index, "wnid": entry.wnid, "name": entry.name}
                for entry in self.classes
            ],
            "splits": {
                name: {
                    "num_samples": entry.num_samples,
                    "num_rejected": entry.num_rejected,
                    "shards": [shard_info_dict(info) for info in entry.shards],
                }
                for name, entry in self.splits.items()
            },
            "stats": self.stats,
            "mean": self.mean,
            "rejected": self.rejected,
        }


def shard_name(split: str, shard_index: int) -> str:
    """The file name of a shard: ``train-000000.tar``."""
    return f"{split}-{shard_index:06d}.tar"


def index_name(tar_name: str) -> str:
    """The DALI index beside a shard: ``train-000000.idx``."""
    return str(Path(tar_name).with_suffix(".idx"))


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a plain file name (no path, no shell syntax), else raise."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise UserError(f"refusing file name {name!r} from the manifest: not a plain file name")
    return name


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically (temp + fsync + rename)."""
    write_text_atomic(Path(path), dumps_json(obj))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``DIRECTORY/manifest.json``, atomically: the one writer of manifests."""
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.as_json())


# --- the one parser ---------------------------------------------------------------------------


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The :class:`Manifest` in ``data`` (the bytes of a manifest.json), checked.

    ``where`` names the file (a path or a URL) in the messages. Refused with
    a UserError: text that is not a JSON object, another format, a missing
    or mistyped field, a shard that is not a plain ``.tar`` file name.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{where}: cannot read the manifest ({error})") from None
    if not isinstance(document, dict):
        raise UserError(f"{where}: expected a JSON object")
    found = document.get("format")
    if found != FORMAT:
        raise UserError(
            f"{where}: shards of format {found!r}, this alexpipe reads {FORMAT!r}; "
            "rebuild them with build-shards"
        )
    if not isinstance(document.get("splits"), dict):
        raise UserError(f"{where}: no 'splits' section")
    try:
        return Manifest(
            config=dict(document.get("config", {})),
            classes=tuple(
                ClassInfo(int(entry["index"]), str(entry["wnid"]), str(entry["name"]))
                for entry in document.get("classes", [])
            ),
            splits={
                str(name): _split_entry(entry, where) for name, entry in document["splits"].items()
            },
            stats=_optional_name(document, "stats"),
            mean=_optional_name(document, "mean"),
            rejected=_optional_name(document, "rejected"),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{where}: malformed manifest ({type(error).__name__}: {error})") from None


def _split_entry(entry: dict, where: str) -> SplitEntry:
    shards = []
    for row in entry.get("shards", []):
        if not str(row.get("file", "")).endswith(".tar"):
            raise UserError(f"{where}: shard entry {row!r} does not name a .tar file")
        shards.append(
            ShardInfo(
                file=check_file_name(row["file"]),
                num_samples=int(row["num_samples"]),
                bytes=int(row["bytes"]),
                sha256=str(row["sha256"]),
            )
        )
    return SplitEntry(
        num_samples=int(entry["num_samples"]),
        num_rejected=int(entry.get("num_rejected", 0)),
        shards=tuple(shards),
    )


def _optional_name(document: dict, key: str) -> str | None:
    value = document.get(key)
    return None if value is None else check_file_name(value)
