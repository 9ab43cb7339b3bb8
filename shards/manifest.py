"""The shard directory's manifest: names, loading with clear errors, and shard paths.

``manifest.json`` is written last and atomically by a build, so its presence
means the directory is complete (SPEC §4). Everything that opens a shard
directory goes through :func:`load_manifest`, which turns every way of
pointing at the wrong place into a one-line :class:`UserError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shards.atomic import dumps_json, write_text_atomic
from shards.errors import UserError
from shards.writer import ShardInfo

FORMAT = "alexpipe-shards/1"
MANIFEST_NAME = "manifest.json"
STATS_NAME = "stats.json"
MEAN_NAME = "mean.npy"
MEAN_PNG_NAME = "mean.png"
REJECTED_NAME = "rejected.jsonl"
SPLITS = ("train", "val")


def shard_name(split: str, shard_index: int) -> str:
    """The file name of a shard: ``train-000000.tar``."""
    return f"{split}-{shard_index:06d}.tar"


def index_name(tar_name: str) -> str:
    """The DALI index beside a shard: ``train-000000.idx``."""
    return str(Path(tar_name).with_suffix(".idx"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically (temp + fsync + rename)."""
    write_text_atomic(Path(path), dumps_json(obj))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read {what} ({error})") from None


def load_manifest(shards_dir: Path) -> dict:
    """Load and sanity-check ``SHARDS_DIR/manifest.json``.

    Raises :class:`UserError` when the directory is missing or not a
    directory, when the manifest is missing (an unfinished or never-run
    build), unreadable, or of another format.
    """
    shards_dir = Path(shards_dir)
    if not shards_dir.exists():
        raise UserError(f"shard directory {shards_dir} does not exist")
    if not shards_dir.is_dir():
        raise UserError(f"{shards_dir} is not a directory")
    path = shards_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{shards_dir} is not a complete alexpipe shard directory (no {MANIFEST_NAME}); "
            "run build-shards"
        )
    return check_format(_read_json(path, "the manifest"), str(path))


def check_format(manifest: Any, label: str) -> dict:
    """Check that ``manifest`` is an alexpipe manifest of this format; return it.

    ``label`` names where it came from (a path or a URL) in the messages.
    """
    if not isinstance(manifest, dict):
        raise UserError(f"{label}: expected a JSON object")
    found = manifest.get("format")
    if found != FORMAT:
        raise UserError(
            f"{label}: shards of format {found!r}, this alexpipe reads {FORMAT!r}; "
            "rebuild them with build-shards"
        )
    if not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{label}: no 'splits' section")
    return manifest


def split_entry(manifest: dict, split: str) -> dict:
    """The manifest's section for ``split``; a UserError names the splits there are."""
    splits = manifest["splits"]
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise UserError(f"split {split!r} is not in the shards (available: {available})")
    return splits[split]


def shard_infos(manifest: dict, split: str) -> list[ShardInfo]:
    """The shards of ``split`` as the manifest records them, in order."""
    return [
        ShardInfo(
            file=entry["file"],
            num_samples=int(entry["num_samples"]),
            bytes=int(entry["bytes"]),
            sha256=entry["sha256"],
        )
        for entry in split_entry(manifest, split)["shards"]
    ]


def shard_paths(shards_dir: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """Paths of the tars of ``split``, in manifest order."""
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else load_manifest(shards_dir)
    return [shards_dir / info.file for info in shard_infos(manifest, split)]


def index_paths(shards_dir: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """Paths of the DALI index files of ``split``, parallel to :func:`shard_paths`."""
    return [path.with_suffix(".idx") for path in shard_paths(shards_dir, split, manifest)]


def num_samples(manifest: dict, split: str) -> int:
    """Number of samples of ``split``."""
    return int(split_entry(manifest, split)["num_samples"])


def num_classes(manifest: dict) -> int:
    """Number of classes (labels are 0..num_classes-1)."""
    return len(manifest["classes"])
