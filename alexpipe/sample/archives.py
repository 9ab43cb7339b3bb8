"""Byte-reproducible tar and gzip writing.

Every header field that tar and gzip would take from the clock or the user
(mtime, uid, owner names, the gzip file name) is fixed, so the same members in
the same order always give the same bytes.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from shards.atomic import atomic_file

# 2012-06-01 00:00 UTC, around when ILSVRC-2012 was released.
ARCHIVE_MTIME = 1_338_508_800
# GNU tar's format, which the real ILSVRC archives use.
TAR_FORMAT = tarfile.GNU_FORMAT


def _member(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = ARCHIVE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    return info


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append a regular file member."""
    archive.addfile(_member(name, len(data)), io.BytesIO(data))


def add_directory(archive: tarfile.TarFile, name: str) -> None:
    """Append a directory member (``name`` ends with '/')."""
    archive.addfile(_member(name, directory=True))


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """An in-memory tar of (name, data) members, in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=TAR_FORMAT) as archive:
        for name, data in members:
            add_file(archive, name, data)
    return buffer.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no file name and mtime 0 in the header."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as out:
        out.write(data)
    return buffer.getvalue()


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Stream (name, data) members into a tar at ``path``, written under a
    temporary name first so a half-written archive is never mistaken for one."""
    with atomic_file(path) as stream:
        with tarfile.open(fileobj=stream, mode="w", format=TAR_FORMAT) as archive:
            for name, data in members:
                add_file(archive, name, data)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a small file, creating its parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
