"""Read shards back: members with their offsets, and samples grouped by key.

The reader is strict because a shard is a file from disk, not a promise:
links, devices, directories, absolute names and ``..`` are refused rather
than followed, a truncated tar is an error (``tarfile`` alone would treat a
tar cut at a member boundary as complete), and a key that reappears later
in the tar is an error instead of a silently split sample.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shards.errors import UserError
from shards.index import split_name

HASH_CHUNK = 1 << 20


class ShardFormatError(UserError):
    """A shard file that is not a well-formed alexpipe/WebDataset tar."""


@dataclass(frozen=True)
class TarMember:
    """A regular file in a tar: where its header and data start, and its size."""

    name: str
    header_offset: int
    data_offset: int
    size: int

    def as_tuple(self) -> tuple[str, int, int, int]:
        """(name, header_offset, data_offset, size), the shape ``index.build_index`` takes."""
        return self.name, self.header_offset, self.data_offset, self.size


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` must not be used (link, device, path escape...), or None if it is fine."""
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    if member.isdev():
        return "is a device or fifo"
    if member.isdir():
        return "is a directory"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"has unsupported type {member.type!r}"
    if unsafe_name(member.name):
        return "has an unsafe path"
    return None


def unsafe_name(name: str) -> bool:
    """True if a member name is empty, absolute, climbs out with ``..`` or has a backslash."""
    return not name or name.startswith("/") or "\\" in name or ".." in name.split("/")


def _checked_members(archive: tarfile.TarFile, label: str, file_size: int) -> Iterator:
    for member in archive:
        reason = unsafe_member_reason(member)
        if reason:
            raise ShardFormatError(f"{label}: member {member.name!r} {reason}; refusing it")
        if member.offset_data + member.size > file_size:
            raise ShardFormatError(f"{label}: truncated inside member {member.name!r}")
        yield member
    # tarfile stops quietly at a missing header; a real end is two zero blocks.
    if archive.offset + 2 * tarfile.BLOCKSIZE > file_size:
        raise ShardFormatError(f"{label}: truncated (no end-of-archive marker)")


def _open(tar_path: Path) -> tuple[tarfile.TarFile, int]:
    try:
        archive = tarfile.open(tar_path, "r:")
    except (tarfile.TarError, OSError) as error:
        raise ShardFormatError(f"{Path(tar_path).name}: cannot read as tar ({error})") from None
    return archive, os.fstat(archive.fileobj.fileno()).st_size


def iter_members(tar_path: Path) -> Iterator[TarMember]:
    """Yield every member of ``tar_path`` with its offsets, in tar order, without reading data."""
    tar_path = Path(tar_path)
    archive, file_size = _open(tar_path)
    with archive:
        try:
            for member in _checked_members(archive, tar_path.name, file_size):
                yield TarMember(member.name, member.offset, member.offset_data, member.size)
        except tarfile.TarError as error:
            raise ShardFormatError(f"{tar_path.name}: corrupt tar ({error})") from None


def iter_shard(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` samples from a shard, in tar order.

    A sample is a run of consecutive members whose names share the key stem
    (everything before the first ``.`` of the basename); ``ext`` is the rest
    (``"jpg"``, ``"cls"``, ``"json"``). Raises :class:`ShardFormatError` on
    unsafe members, truncation, repeated keys or repeated extensions.
    """
    tar_path = Path(tar_path)
    label = tar_path.name
    archive, file_size = _open(tar_path)
    finished_keys: set[str] = set()
    current_key: str | None = None
    current: dict[str, bytes] = {}
    with archive:
        try:
            for member in _checked_members(archive, label, file_size):
                key, ext = split_name(member.name)
                if not PurePosixPath(key).name or not ext:
                    raise ShardFormatError(f"{label}: member {member.name!r} has no KEY.ext name")
                if key != current_key:
                    if current_key is not None:
                        finished_keys.add(current_key)
                        yield current_key, current
                    if key in finished_keys:
                        raise ShardFormatError(f"{label}: key {key!r} appears twice")
                    current_key, current = key, {}
                if ext in current:
                    raise ShardFormatError(f"{label}: {member.name!r} appears twice")
                current[ext] = archive.extractfile(member).read()
        except tarfile.TarError as error:
            raise ShardFormatError(f"{label}: corrupt tar ({error})") from None
    if current_key is not None:
        yield current_key, current


def decode_label(data: bytes) -> int:
    """The label stored in a ``.cls`` member (ASCII decimal, as the writer makes it)."""
    if not data or not data.isdigit():
        raise ValueError(f"label {data[:20]!r} is not an ASCII decimal")
    return int(data)


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
