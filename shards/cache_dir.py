"""The files of a shard cache directory: their names, its lock, and what a previous run left.

A staged shard is ``<shard stem>.<first 16 hex of its sha256>.tar`` with its
index beside it (``.idx``), so a file under a final name is, by
construction, the verified content of that manifest entry, and a later run
with the same directory can reuse it. One process owns a cache directory at
a time: :func:`claim_cache_dir` takes an exclusive lock on its ``.lock``.
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from shards.atomic import remove_temporaries
from shards.errors import UserError
from shards.index import IndexDigest
from shards.writer import ShardInfo

LOCK_NAME = ".lock"
DIGEST_LENGTH = 16
CACHED_NAME = re.compile(r"(?P<stem>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<digest>[0-9a-f]{16})\.tar")


def cached_name(info: ShardInfo) -> str:
    """The file name of a shard in the cache: ``train-000000.<sha256[:16]>.tar``."""
    return f"{info.file.removesuffix('.tar')}.{info.sha256[:DIGEST_LENGTH]}.tar"


def staged_bytes(info: ShardInfo, index: IndexDigest) -> int:
    """What a staged shard takes in the cache: its tar and its index."""
    return info.bytes + index.bytes


def claim_cache_dir(cache_dir: Path) -> IO[str]:
    """Create ``cache_dir``, lock it for this process and clear unfinished downloads.

    Returns the open lock file; closing it lets go of the directory. Raises
    a ``UserError`` if another process holds it.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle = open(cache_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"cache directory {cache_dir} is in use by another process; "
            "give each process its own --cache-dir"
        ) from None
    remove_temporaries(cache_dir)
    return handle


def leftover_shards(
    cache_dir: Path, infos: Iterable[ShardInfo]
) -> list[tuple[str, ShardInfo | None, int]]:
    """Shards a previous run staged in ``cache_dir``, oldest first; broken ones are deleted.

    Each is ``(file name, manifest entry, bytes of tar and index)``; the entry
    is None for a shard of another dataset (it still takes room). A tar
    without its index, an index without its tar, and a tar whose size is not
    the manifest's are removed.
    """
    by_cached_name = {cached_name(info): info for info in infos}
    found = []
    for path in Path(cache_dir).iterdir():
        if not CACHED_NAME.fullmatch(path.with_suffix(".tar").name):
            continue  # not ours
        if path.suffix == ".idx" and not path.with_suffix(".tar").exists():
            path.unlink(missing_ok=True)  # an index whose tar never arrived
            continue
        if path.suffix != ".tar":
            continue
        index_path = path.with_suffix(".idx")
        info = by_cached_name.get(path.name)
        status = path.stat()
        if not index_path.exists() or (info is not None and status.st_size != info.bytes):
            path.unlink(missing_ok=True)
            index_path.unlink(missing_ok=True)
            continue
        total = status.st_size + index_path.stat().st_size
        found.append((status.st_mtime, path.name, info, total))
    found.sort(key=lambda row: row[:2])
    return [(name, info, total) for _mtime, name, info, total in found]
