"""Write one WebDataset shard (a tar) and its DALI index, reproducibly and atomically.

Same samples in the same order give the same bytes, on any machine: every
header field that could vary (mtime, owner, permissions, format) is fixed,
member order is fixed (``KEY.cls``, ``KEY.jpg``, ``KEY.json``) and the JSON
is rendered canonically. That is what lets a rerun of a crashed build end
byte-identical to an uninterrupted one.

The tar is produced by writing USTAR headers ourselves (``TarInfo.tobuf``)
rather than through ``tarfile.TarFile``, so that each member's header and
data offsets are known as they are written (for the index) and the sha256
and size are computed on the way out, without reading the file back.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shards.atomic import atomic_file, write_text_atomic
from shards.index import build_index

# Keys become tar names "KEY.ext" and index fields, so: no dot (the key is
# everything before the first dot), no slash, no whitespace, no leading
# dash or underscore (webdataset reserves "__key__"-like names), and short
# enough for the 100-byte USTAR name field with the longest extension.
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_KEY_LENGTH = 100 - len(".json")
MEMBER_EXTENSIONS = ("cls", "jpg", "json")
MEMBER_MODE = 0o644
TAR_FORMAT = tarfile.USTAR_FORMAT


@dataclass(frozen=True)
class ShardSample:
    """One sample to store: ``KEY.jpg`` (bytes as given), ``KEY.cls``, ``KEY.json``."""

    key: str
    jpg: bytes
    label: int
    meta: dict


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about a written shard."""

    file: str
    num_samples: int
    bytes: int
    sha256: str


def is_valid_key(key: str) -> bool:
    """True if ``key`` can be used as a sample key stem in a shard."""
    return (
        isinstance(key, str)
        and len(key) <= MAX_KEY_LENGTH
        and KEY_PATTERN.fullmatch(key) is not None
    )


def encode_label(label: int) -> bytes:
    """The ``.cls`` payload: the label as ASCII decimal, no newline."""
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"label must be a non-negative int, got {label!r}")
    return str(label).encode("ascii")


def encode_meta(meta: dict) -> bytes:
    """The ``.json`` payload: canonical JSON (sorted keys, no spaces, ASCII)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file, with every variable field fixed."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=TAR_FORMAT, encoding="ascii", errors="strict")


def end_of_archive(position: int) -> bytes:
    """Two zero blocks, then zeros up to a whole 10240-byte record, as tar(1) and tarfile do."""
    trailer_size = 2 * tarfile.BLOCKSIZE
    remainder = (position + trailer_size) % tarfile.RECORDSIZE
    padding = tarfile.RECORDSIZE - remainder if remainder else 0
    return tarfile.NUL * (trailer_size + padding)


class _HashingWriter:
    """Writes through to a file while keeping the position and the sha256 of all bytes."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.position = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.position += len(data)


def _write_member(out: _HashingWriter, name: str, data: bytes) -> tuple[str, int, int, int]:
    header_offset = out.position
    out.write(member_header(name, len(data)))
    data_offset = out.position
    out.write(data)
    remainder = len(data) % tarfile.BLOCKSIZE
    if remainder:
        out.write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))
    return name, header_offset, data_offset, len(data)


def _member_payloads(sample: ShardSample) -> list[tuple[str, bytes]]:
    if not is_valid_key(sample.key):
        raise ValueError(
            f"sample key {sample.key!r} is not a safe name "
            f"(letters, digits, '_' and '-', at most {MAX_KEY_LENGTH} characters)"
        )
    if not isinstance(sample.jpg, (bytes, bytearray, memoryview)):
        raise ValueError(f"{sample.key}: jpg must be bytes, got {type(sample.jpg).__name__}")
    if not sample.jpg:
        raise ValueError(f"{sample.key}: jpg is empty")
    payloads = (encode_label(sample.label), bytes(sample.jpg), encode_meta(sample.meta))
    names = [f"{sample.key}.{ext}" for ext in MEMBER_EXTENSIONS]
    return list(zip(names, payloads, strict=True))


def write_shard(tar_path: Path, samples: Iterable[ShardSample]) -> ShardInfo:
    """Write ``samples`` as the tar ``tar_path`` plus its DALI index beside it.

    ``samples`` is consumed once, streaming. The index
    (``tar_path.with_suffix(".idx")``) is made final before the tar, so a tar
    under its final name always has its index; neither file ever exists
    under its final name partially written. If ``samples`` raises or is
    invalid (unsafe or duplicate key, bad label, empty), nothing is left
    behind and the exception propagates.
    """
    tar_path = Path(tar_path)
    members: list[tuple[str, int, int, int]] = []
    seen_keys: set[str] = set()
    with atomic_file(tar_path, "wb") as handle:
        out = _HashingWriter(handle)
        for sample in samples:
            if sample.key in seen_keys:
                raise ValueError(f"{tar_path.name}: duplicate sample key {sample.key!r}")
            seen_keys.add(sample.key)
            for name, data in _member_payloads(sample):
                members.append(_write_member(out, name, data))
        if not seen_keys:
            raise ValueError(f"{tar_path.name}: a shard needs at least one sample")
        out.write(end_of_archive(out.position))
        # Inside the tar's block: the index is final before the tar is renamed.
        write_text_atomic(tar_path.with_suffix(".idx"), build_index(members))
    return ShardInfo(
        file=tar_path.name,
        num_samples=len(seen_keys),
        bytes=out.position,
        sha256=out.digest.hexdigest(),
    )


def shard_info_dict(info: ShardInfo) -> dict[str, Any]:
    """The manifest entry for a shard (docs/format.md: file, num_samples, bytes, sha256)."""
    return {
        "file": info.file,
        "num_samples": info.num_samples,
        "bytes": info.bytes,
        "sha256": info.sha256,
    }
