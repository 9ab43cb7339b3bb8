"""Find where each member's bytes lie in a tar file, without extracting anything.

The official ImageNet train tar is 138 GB of 1000 uncompressed ``<wnid>.tar``
members, 1.28 M images in all. Reading it in place needs only the absolute
byte offset and size of every image: a tar stores a member's data verbatim
after its 512-byte header, so the offset of an image inside an inner tar is
the inner tar's data offset in the outer file plus the image's offset inside
the inner tar. ``scan_tar`` reads the headers alone (one ``pread`` of 512
bytes per member, seeking over the data), so listing ImageNet costs about one
small read per image, never the 138 GB.

The parser is our own rather than :mod:`tarfile` because it must be strict
where ``tarfile`` is lenient: a corrupt header in the middle of an archive
ends a ``tarfile`` listing silently (losing every later image, or whole
classes), while here it is an error naming the file and the byte offset. It
understands POSIX ustar, pax extended headers and GNU long names, which
covers what GNU tar, bsdtar and Python's tarfile write.

Members are described, never followed: ``rejection_reason`` says why a
member (a link, a device, an absolute or ``..`` path) must not be read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shards.errors import UserError

BLOCK = 512

# Typeflags (POSIX and GNU). Regular data: "0", the pre-POSIX "\0", and "7"
# (contiguous file, which readers treat as a regular file).
_REGULAR = {b"0", b"\0", b"7"}
_KINDS = {
    b"1": "hard link",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "fifo",
    b"S": "sparse file",
    b"V": "volume label",
    b"M": "multi-volume continuation",
}
# Headers that only describe the next member; their data is metadata.
_GNU_LONG_NAME = b"L"
_GNU_LONG_LINK = b"K"
_PAX_NEXT = b"x"
_PAX_GLOBAL = b"g"
# The kinds whose size field counts data blocks after the header. For links,
# directories and devices the size is meaningless and not skipped (as GNU
# tar and Python's tarfile do).
_HAS_DATA = _REGULAR | {b"S", b"M", _GNU_LONG_NAME, _GNU_LONG_LINK, _PAX_NEXT, _PAX_GLOBAL}


@dataclass(frozen=True, slots=True)
class TarMember:
    """One member of a tar: its name, kind and where its data lies.

    ``offset`` is absolute in the file that was scanned (for a tar inside a
    tar: in the outer file), so ``pread(size, offset)`` returns the data.
    """

    name: str
    kind: str  # "file", "directory", "symlink", "hard link", "... device", ...
    offset: int
    size: int


def rejection_reason(member: TarMember) -> str | None:
    """Why this member must not be read, or None for a safe regular file.

    Links, devices and other special members are never followed, and names
    that could point outside the archive (absolute, ``..``) are refused even
    though we never write them to disk: a name is also a key and a source.
    """
    if member.kind != "file":
        return f"unsafe tar member: {member.kind}, not followed"
    if not member.name:
        return "unsafe tar member: empty name"
    if member.name.startswith("/"):
        return "unsafe tar member: absolute path"
    if ".." in member.name.split("/"):
        return "unsafe tar member: '..' in path"
    return None


def scan_tar(path: str | Path, start: int = 0, end: int | None = None) -> Iterator[TarMember]:
    """Yield the members of the tar stored in ``path`` at bytes [start, end).

    ``start``/``end`` locate a tar stored inside another file (an inner
    ``<wnid>.tar``); by default the whole file. Only headers are read. A
    structurally broken archive (bad checksum, data past the end, no
    end-of-archive marker) raises
    :class:`UserError` naming the file and the offset, because a silently
    shortened listing would drop images or whole classes.
    """
    path = Path(path)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        if end is None:
            end = os.fstat(descriptor).st_size
        yield from _scan(descriptor, path, start, end)
    finally:
        os.close(descriptor)


def _scan(descriptor: int, path: Path, start: int, end: int) -> Iterator[TarMember]:
    position = start
    pending: dict[str, str] = {}  # long name / pax values for the next member
    while True:
        if position == end:
            # GNU tar and tarfile tolerate this, but it is exactly what a tar cut
            # off at a member boundary looks like: later members would vanish.
            raise UserError(
                f"{path}: the archive ends at byte {position} without its end-of-archive "
                "marker (truncated file?)"
            )
        header = _read_exactly(descriptor, path, position, BLOCK, end)
        if header == bytes(BLOCK):
            return  # end-of-archive marker
        _check_checksum(header, path, position)
        typeflag = header[156:157]
        size = _parse_number(header[124:136], path, position)
        name = _header_name(header)
        data_offset = position + BLOCK
        extra_blocks = 0
        if typeflag == b"S" and header[482] != 0:
            extra_blocks = _count_sparse_extensions(descriptor, path, data_offset, end)
            data_offset += extra_blocks * BLOCK
        data_size = size if typeflag in _HAS_DATA else 0
        next_position = data_offset + _padded(data_size)
        if next_position > end:
            raise UserError(
                f"{path}: tar member {name!r} at byte {position} runs past the end of the archive "
                "(truncated file?)"
            )
        position = next_position

        if typeflag == _GNU_LONG_NAME:
            pending["path"] = _read_text(descriptor, path, data_offset, size, end).rstrip("\0")
            continue
        if typeflag == _GNU_LONG_LINK:
            continue  # link targets are never followed, so never needed
        if typeflag == _PAX_NEXT:
            pending.update(_parse_pax(_read_raw(descriptor, path, data_offset, size, end), path))
            continue
        if typeflag == _PAX_GLOBAL:
            continue  # global defaults (mtime, charset...) do not affect names or sizes

        if "path" in pending:
            name = pending["path"]
        if "size" in pending and typeflag in _REGULAR:
            size = _parse_decimal(pending["size"], path, position)
            position = data_offset + _padded(size)
            if position > end:
                raise UserError(f"{path}: tar member {name!r} runs past the end of the archive")
        pending = {}
        kind = "file" if typeflag in _REGULAR else _KINDS.get(typeflag, f"type {typeflag!r}")
        yield TarMember(name=name, kind=kind, offset=data_offset, size=size)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _read_exactly(descriptor: int, path: Path, offset: int, size: int, end: int) -> bytes:
    if offset + size > end:
        raise UserError(f"{path}: tar header at byte {offset} is cut off (truncated file?)")
    data = os.pread(descriptor, size, offset)
    if len(data) != size:
        raise UserError(f"{path}: short read at byte {offset} (truncated file?)")
    return data


def _read_raw(descriptor: int, path: Path, offset: int, size: int, end: int) -> bytes:
    if size > 1 << 20:
        raise UserError(f"{path}: extended tar header at byte {offset} is implausibly large")
    return _read_exactly(descriptor, path, offset, size, end)


def _read_text(descriptor: int, path: Path, offset: int, size: int, end: int) -> str:
    return _read_raw(descriptor, path, offset, size, end).decode("utf-8", "replace")


def _check_checksum(header: bytes, path: Path, position: int) -> None:
    stored = _parse_number(header[148:156], path, position)
    # The checksum is computed with its own field taken as eight spaces;
    # old tars summed signed chars, so both sums are accepted (as tarfile does).
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return
    signed = unsigned - 256 * sum(1 for byte in header[:148] + header[156:] if byte > 127)
    if stored != signed:
        raise UserError(f"{path}: invalid tar header at byte {position} (bad checksum)")


def _parse_number(field: bytes, path: Path, position: int) -> int:
    """A numeric header field: octal ASCII, or GNU base-256 for large values."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:  # negative base-256: never valid for sizes
            raise UserError(f"{path}: negative number in tar header at byte {position}")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise UserError(f"{path}: invalid tar header at byte {position}") from None


def _parse_decimal(text: str, path: Path, position: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{path}: invalid pax size at byte {position}") from None
    if value < 0:
        raise UserError(f"{path}: invalid pax size at byte {position}")
    return value


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    # POSIX ustar splits long names into prefix + "/" + name; the GNU format
    # ("ustar  \0") uses those bytes for other fields.
    if header[257:263] == b"ustar\0":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _count_sparse_extensions(descriptor: int, path: Path, offset: int, end: int) -> int:
    """Old GNU sparse members may chain extension blocks before their data."""
    count = 0
    while True:
        block = _read_exactly(descriptor, path, offset + count * BLOCK, BLOCK, end)
        count += 1
        if block[504] == 0:
            return count


def _parse_pax(data: bytes, path: Path) -> dict[str, str]:
    """Records of the form ``"<length> <key>=<value>\\n"``; keep path and size."""
    values: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        try:
            length = int(data[position:space])
        except ValueError:
            raise UserError(f"{path}: invalid pax extended header") from None
        if length <= 0 or position + length > len(data):
            raise UserError(f"{path}: invalid pax extended header")
        record = data[space + 1 : position + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        if key in (b"path", b"size"):
            values[key.decode()] = value.decode("utf-8", "replace")
        position += length
    return values
