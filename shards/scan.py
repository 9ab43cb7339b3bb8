"""One pass over a shard file: every byte hashed, every tar header parsed, small members kept.

``scan_shard`` reads a tar front to back exactly once, in large chunks: each
chunk goes through sha256 and, while it is still in cache, the tar headers
in it are parsed and the payloads the caller asks for are handed over. What
``alexpipe verify`` checks (size, hash, members, samples, the index) thus
comes from the same bytes, read once.

It accepts exactly what :func:`shards.reader.iter_shard` accepts from a
USTAR shard and refuses with the same messages: links, devices, directories
and unsafe names (``unsafe_member_reason``), truncation, a key that comes
back later, an extension twice in one sample. A header with a bad checksum
after the first one is an error here (``tarfile`` takes it for the end of
the archive), and pax or GNU long-name headers, which ``write_shard`` never
writes, are refused as unsupported types.

Regular-file headers are parsed here instead of by ``tarfile.TarInfo.frombuf``,
which decodes every field of every header: measured on the 2-core dev machine,
55 µs a header against about 3 µs here (checksums are summed for all headers
at once, in numpy), and a 1,000-sample shard has 3,000 headers: 165 ms with
tarfile against ~17 ms for sha256 over its 22 MB. Any other header goes
through ``tarfile`` itself.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tarfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from shards.reader import ShardFormatError, unsafe_member_reason, unsafe_name

# Large enough that the per-chunk Python work vanishes next to hashing it,
# small enough to stay in L2/L3 between the hash and the header parse.
CHUNK_SIZE = 1 << 20
BLOCK = tarfile.BLOCKSIZE
ZERO_BLOCK = bytes(BLOCK)
PLAIN_TYPES = (tarfile.REGTYPE[0], tarfile.AREGTYPE[0])  # type flags as ints
NAME_ENCODING = sys.getfilesystemencoding()  # what tarfile decodes names with


@dataclass
class ShardScan:
    """What one pass over a shard found.

    ``members`` are (name, header_offset, data_offset, size) in tar order, as
    ``shards.index.group_components`` takes them. ``member_error``: why the
    tar's structure is unusable (the rest of the file was still hashed).
    ``sample_error``: why sample grouping stopped (a repeated key or
    extension, a name without ``KEY.ext``); the samples before it were handed over.
    ``index_lines``: each sample's line of a DALI index (``shards.index``),
    for the samples handed over.
    """

    file_size: int
    bytes_read: int = 0
    sha256: str = ""
    members: list[tuple[str, int, int, int]] = field(default_factory=list)
    member_error: str | None = None
    sample_error: str | None = None
    index_lines: list[str] = field(default_factory=list)


class _HashingWindow:
    """A file read once, front to back, every byte hashed as it is read.

    ``take(offset, length)`` returns those bytes; offsets only move forward, so
    bytes that nobody asks for (a JPEG that is not decoded) are hashed and
    dropped with their chunk, never copied.
    """

    def __init__(self, handle, digest):
        self._handle = handle
        self._digest = digest
        self._window = b""
        self._start = 0
        self.bytes_read = 0

    def _read_chunk(self) -> bytes:
        chunk = self._handle.read(CHUNK_SIZE)
        if chunk:
            self._digest.update(chunk)
            self.bytes_read += len(chunk)
        return chunk

    def take(self, offset: int, length: int) -> bytes:
        """Bytes ``offset`` to ``offset + length`` (fewer at the end of the file)."""
        end = offset + length
        window_end = self._start + len(self._window)
        if offset >= self._start and end <= window_end:
            begin = offset - self._start
            return self._window[begin : begin + length]
        pieces = []
        while True:
            window_end = self._start + len(self._window)
            if offset < window_end:
                low = max(offset, self._start) - self._start
                pieces.append(self._window[low : min(end, window_end) - self._start])
            if end <= window_end:
                break
            chunk = self._read_chunk()
            if not chunk:
                break
            self._start, self._window = window_end, chunk
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def drain(self) -> None:
        """Hash the rest of the file."""
        self._window = b""
        while self._read_chunk():
            pass


def _octal(field_bytes: bytes) -> int:
    """A numeric header field (octal digits, NUL or space padded); ValueError otherwise."""
    return int(field_bytes.strip(b"\0 ") or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    """The header checksum, as tarfile checks it (unsigned, or the signed variant)."""
    try:
        recorded = _octal(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 256
    if recorded == unsigned:
        return True
    return recorded == 256 + sum(struct.unpack_from("148b8x356b", header))


def _first_bad_checksum(headers: list[bytes]) -> int | None:
    """The index of the first header whose checksum is wrong, or None.

    All of a shard's headers at once, in numpy: ``sum()`` over a 512-byte
    header is most of what parsing one costs in Python (4 of 8 µs).
    """
    if not headers:
        return None
    import numpy

    blocks = numpy.frombuffer(b"".join(headers), numpy.uint8).reshape(len(headers), BLOCK)
    sums = blocks.sum(axis=1, dtype=numpy.int64) + 256
    sums -= blocks[:, 148:156].sum(axis=1, dtype=numpy.int64)
    # The field as tarfile writes it: six octal digits, NUL, space.
    digits = blocks[:, 148:154].astype(numpy.int64) - ord("0")
    recorded = digits @ (8 ** numpy.arange(5, -1, -1, dtype=numpy.int64))
    standard = (digits >= 0).all(axis=1) & (digits <= 7).all(axis=1)
    standard &= (blocks[:, 154] == 0) & (blocks[:, 155] == ord(" "))
    for index in numpy.flatnonzero(~standard | (recorded != sums)):
        if not _checksum_ok(headers[index]):  # another spelling, or really wrong
            return int(index)
    return None


def _parse_other(header: bytes, label: str, position: int) -> tuple[str, int]:
    """(name, size) of a header that is not a plain regular file, through tarfile's own
    parser, which says what it is (link, device, directory, long name) to refuse it."""
    if not _checksum_ok(header):
        raise ShardFormatError(f"{label}: corrupt tar (bad header checksum at byte {position})")
    try:
        member = tarfile.TarInfo.frombuf(header, NAME_ENCODING, "surrogateescape")
    except tarfile.HeaderError as error:
        raise ShardFormatError(f"{label}: corrupt tar ({error} at byte {position})") from None
    reason = unsafe_member_reason(member)
    if reason:
        raise ShardFormatError(f"{label}: member {member.name!r} {reason}; refusing it")
    return member.name, member.size


def _has_basename(key: str) -> bool:
    """``PurePosixPath(key).name`` is not empty (as reader.iter_shard requires), quickly."""
    return bool(key) and ("/" not in key or bool(PurePosixPath(key).name))


def scan_shard(
    tar_path: Path,
    keep: Collection[str],
    on_sample: Callable[[str, dict[str, bytes | None]], None],
) -> ShardScan:
    """Read ``tar_path`` once: hash it, parse it, call ``on_sample(key, parts)`` per sample.

    ``parts`` maps each extension of the sample to its bytes if the extension
    is in ``keep``, else to None (present, not read into memory). Samples are
    handed over as they complete, in tar order; samples after a
    ``sample_error`` are not. With a ``member_error``, what was handed over
    may come from headers that turned out corrupt. Raises OSError if the file
    cannot be opened.
    """
    tar_path = Path(tar_path)
    label = tar_path.name
    digest = hashlib.sha256()
    # The plain regular-file headers and where they are, checksummed at the end.
    headers: list[bytes] = []
    header_positions: list[int] = []
    with open(tar_path, "rb", buffering=0) as handle:
        scan = ShardScan(file_size=os.fstat(handle.fileno()).st_size)
        window = _HashingWindow(handle, digest)
        try:
            _walk(window, scan, label, keep, on_sample, (headers, header_positions))
        except ShardFormatError as error:
            scan.member_error = str(error)
        window.drain()
    # tarfile checks a header's checksum before anything in it: a bad one
    # outranks whatever its fields led to.
    bad = _first_bad_checksum(headers)
    if bad is not None:
        scan.member_error = (
            f"{label}: corrupt tar (bad header checksum at byte {header_positions[bad]})"
        )
    scan.bytes_read = window.bytes_read
    scan.sha256 = digest.hexdigest()
    return scan


def _walk(window: _HashingWindow, scan: ShardScan, label, keep, on_sample, checked) -> None:
    """Parse every header; group members into samples until a sample error.

    The loop runs 3,000 times a 1,000-sample shard, so it is written out
    flat; its checksums are left to :func:`_first_bad_checksum`.
    """
    file_size = scan.file_size
    members = scan.members
    headers, header_positions = checked
    take = window.take
    position = 0
    finished_keys: set[str] = set()
    current_key: str | None = None
    current: dict[str, bytes | None] = {}
    fields: list[str] = []  # the current sample's index fields
    index_lines = scan.index_lines
    header = take(0, BLOCK)
    if len(header) < BLOCK:
        reason = "empty file" if not header else "truncated header"
        raise ShardFormatError(f"{label}: cannot read as tar ({reason})")
    if header != ZERO_BLOCK and not _checksum_ok(header):
        reason = "bad checksum"  # or, as tarfile says when the field is no number:
        try:
            _octal(header[148:156])
        except ValueError:
            reason = "invalid header"
        raise ShardFormatError(f"{label}: cannot read as tar ({reason})")
    while True:
        if position > file_size:  # the last member's padding is cut (tarfile's wording)
            raise ShardFormatError(f"{label}: corrupt tar (unexpected end of data)")
        header = take(position, BLOCK)
        if len(header) < BLOCK or header == ZERO_BLOCK:
            # A real end is two zero blocks; a tar cut at a member boundary has none.
            if position + 2 * BLOCK > file_size:
                raise ShardFormatError(f"{label}: truncated (no end-of-archive marker)")
            break
        name_end = header.find(0, 0, 100)
        name = header[: 100 if name_end < 0 else name_end].decode(NAME_ENCODING, "surrogateescape")
        if header[156] in PLAIN_TYPES and header[345] == 0 and not name.endswith("/"):
            headers.append(header)
            header_positions.append(position)
            try:
                size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            except ValueError:
                raise ShardFormatError(
                    f"{label}: corrupt tar (bad size field at byte {position})"
                ) from None
            if not name or "\\" in name or (("/" in name or name == "..") and unsafe_name(name)):
                raise ShardFormatError(f"{label}: member {name!r} has an unsafe path; refusing it")
        else:
            name, size = _parse_other(header, label, position)
        members.append((name, position, position + BLOCK, size))
        data_offset = position + BLOCK
        if data_offset + size > file_size:
            raise ShardFormatError(f"{label}: truncated inside member {name!r}")
        position = data_offset + -(-size // BLOCK) * BLOCK
        if scan.sample_error is not None:
            continue  # still walking: a broken structure later outranks it
        dot = name.find(".", name.rfind("/") + 1)  # split_name, inline: 3,000 calls
        key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])
        if not ext or (key != current_key and not _has_basename(key)):
            scan.sample_error = f"{label}: member {name!r} has no KEY.ext name"
            continue
        if key != current_key:
            if current_key is not None:
                finished_keys.add(current_key)
                index_lines.append(" ".join(fields))
                on_sample(current_key, current)
            if key in finished_keys:
                scan.sample_error = f"{label}: key {key!r} appears twice"
                continue
            current_key, current, fields = key, {}, []
        if ext in current:
            scan.sample_error = f"{label}: {name!r} appears twice"
            continue
        current[ext] = take(data_offset, size) if ext in keep else None
        fields.append(f"{ext} {data_offset} {size} {name}")  # as index.render_index writes it
    if scan.sample_error is None and current_key is not None:
        index_lines.append(" ".join(fields))
        on_sample(current_key, current)
