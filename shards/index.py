"""DALI index files (``.idx``) for ``fn.readers.webdataset``.

With an index, DALI seeks straight to each member instead of scanning the
tar at start-up. The format, as read by DALI's C++ loader
(``dali/operators/reader/loader/webdataset_loader.cc``: ``ParseIndexFile``,
``ParseSampleDesc``) and written by its ``tools/wds2idx.py``
(``IndexCreator.create_index``):

- line 1: ``v1.2 <number of samples>`` (the count must be positive);
- then one line per sample, its components in tar order, each component
  four space-separated fields ``<ext> <offset> <size> <filename>``, all
  components of a sample on the same line.

``offset`` is the byte offset of the member's *data* (its header offset
plus the 512-byte header; DALI seeks there and reads ``size`` bytes, and
rejects offsets that are not multiples of 512). ``ext`` is everything after
the first ``.`` of the basename, and a sample is a run of consecutive
members with the same name before that dot. Fields are read with
``operator>>``, so names must not contain whitespace.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

INDEX_VERSION = "v1.2"
TAR_BLOCK_SIZE = 512
# str.isspace's characters (both use the same Unicode table), found in C:
# a generator over each name's characters was most of the time verify spent
# grouping a shard's members.
WHITESPACE = re.compile(r"\s")


class IndexFormatError(ValueError):
    """An index file that DALI would reject or that does not say what we wrote."""


@dataclass(frozen=True)
class IndexComponent:
    """One member of a sample, as an index line describes it."""

    ext: str
    offset: int
    size: int
    filename: str


@dataclass(frozen=True)
class IndexSample:
    """One line of an index file: the key stem and its components in tar order."""

    key: str
    components: tuple[IndexComponent, ...]


@dataclass(frozen=True)
class IndexDigest:
    """An index file's sha256: enough to check a copy of it without keeping its text."""

    sha256: str

    @classmethod
    def of(cls, text: str) -> IndexDigest:
        """The digest of an index file's ``text`` (ASCII, as the build writes it)."""
        return cls(hashlib.sha256(text.encode("ascii")).hexdigest())


def split_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, ext) at the first dot of its basename, as DALI does."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def group_components(members: Iterable[tuple[str, int, int, int]]) -> list[IndexSample]:
    """Group (name, header_offset, data_offset, size) records into samples.

    Consecutive members with the same key form one sample, which is how
    both DALI and webdataset group a tar.
    """
    samples: list[IndexSample] = []
    current_key: str | None = None
    current: list[IndexComponent] = []
    for name, _header_offset, data_offset, size in members:
        if not name or WHITESPACE.search(name):
            raise IndexFormatError(f"member name {name!r} cannot be written to an index")
        if data_offset % TAR_BLOCK_SIZE:
            raise IndexFormatError(f"{name}: data offset {data_offset} is not block-aligned")
        key, ext = split_name(name)
        if key != current_key and current:
            samples.append(IndexSample(current_key, tuple(current)))
            current = []
        current_key = key
        current.append(IndexComponent(ext, data_offset, size, name))
    if current:
        samples.append(IndexSample(current_key, tuple(current)))
    return samples


def render_index(samples: list[IndexSample]) -> str:
    """The text of an index file for ``samples``."""
    if not samples:
        # DALI refuses "v1.2 0"; an empty shard is a bug upstream anyway.
        raise IndexFormatError("an index needs at least one sample")
    lines = []
    for sample in samples:
        fields = []
        for component in sample.components:
            fields += [component.ext, str(component.offset), str(component.size)]
            fields.append(component.filename)
        lines.append(" ".join(fields))
    return index_text(lines)


def index_text(sample_lines: list[str]) -> str:
    """The text of an index file whose sample lines (without newlines) are ``sample_lines``."""
    return "\n".join([f"{INDEX_VERSION} {len(sample_lines)}", *sample_lines]) + "\n"


def build_index(members: Iterable[tuple[str, int, int, int]]) -> str:
    """Index text for tar members given as (name, header_offset, data_offset, size)."""
    return render_index(group_components(members))


def parse_index(text: str) -> list[IndexSample]:
    """Parse index text strictly (version v1.2 only, the one we write).

    Raises :class:`IndexFormatError` naming the line for anything DALI would
    reject or that is inconsistent (count mismatch, misaligned offset, a
    component whose name does not match its ext, mixed keys on a line).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise IndexFormatError("index is empty")
    header = lines[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise IndexFormatError(f"line 1: expected '{INDEX_VERSION} <count>', got {lines[0]!r}")
    try:
        count = int(header[1])
    except ValueError:
        raise IndexFormatError(f"line 1: sample count {header[1]!r} is not a number") from None
    if count <= 0:
        raise IndexFormatError(f"line 1: sample count must be positive, got {count}")
    if len(lines) - 1 != count:
        raise IndexFormatError(f"header says {count} samples but {len(lines) - 1} lines follow")
    return [_parse_sample_line(line, number) for number, line in enumerate(lines[1:], start=2)]


def _parse_sample_line(line: str, number: int) -> IndexSample:
    fields = line.split()
    if not fields or len(fields) % 4:
        raise IndexFormatError(f"line {number}: expected groups of '<ext> <offset> <size> <name>'")
    components = []
    keys = set()
    for start in range(0, len(fields), 4):
        ext, offset_text, size_text, filename = fields[start : start + 4]
        try:
            offset, size = int(offset_text), int(size_text)
        except ValueError:
            raise IndexFormatError(f"line {number}: offset/size not numbers") from None
        if offset < 0 or size < 0 or offset % TAR_BLOCK_SIZE:
            raise IndexFormatError(f"line {number}: bad offset {offset} or size {size}")
        key, name_ext = split_name(filename)
        if name_ext != ext:
            raise IndexFormatError(f"line {number}: ext {ext!r} does not match {filename!r}")
        keys.add(key)
        components.append(IndexComponent(ext, offset, size, filename))
    if len(keys) != 1:
        raise IndexFormatError(f"line {number}: components of different samples {sorted(keys)}")
    return IndexSample(keys.pop(), tuple(components))
