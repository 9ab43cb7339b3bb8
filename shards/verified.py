"""Shard bytes from a source, trusted only once they match the manifest.

A shard read from a :class:`~shards.remote.ShardSource` is checked against
its manifest entry: :func:`open_verified` streams it and compares size and
sha256 as the stream ends; :func:`stage_shard` writes it to a local file
under a temporary name and gives it (and its index, checked against the tar)
the final name only once both match. A mismatch raises
:class:`ShardVerificationError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
from collections.abc import Callable
from pathlib import Path
from typing import IO

from shards.atomic import atomic_file, write_text_atomic
from shards.errors import UserError
from shards.index import IndexDigest, build_index
from shards.reader import iter_members
from shards.remote import CHUNK_BYTES, ShardSource
from shards.writer import ShardInfo


class ShardVerificationError(UserError):
    """A shard whose bytes do not match the manifest's size or sha256; it must not be used."""


class StagingCancelled(Exception):
    """Staging stopped because whoever asked for it is closing."""


class VerifiedStream(io.RawIOBase):
    """A shard's bytes as they arrive, checked against the manifest's size and sha256.

    More bytes than the manifest says fail at once; at the end of the stream
    the size and digest are compared and :class:`ShardVerificationError` is
    raised on a mismatch. Bytes read before that point are *not yet
    trusted*: a streaming consumer must reach the end (``finish()``) before
    it counts what it read as good.
    """

    def __init__(self, raw: IO[bytes], info: ShardInfo, where: str):
        self._raw = raw
        self.info = info
        self.where = where
        self._digest = hashlib.sha256()
        self._count = 0
        self.verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._raw.read(len(buffer))
        except (OSError, http.client.HTTPException) as error:
            raise UserError(f"{self.where}: download failed ({error})") from None
        count = len(data)
        buffer[:count] = data
        self._count += count
        self._digest.update(data)
        if self._count > self.info.bytes:
            raise ShardVerificationError(
                f"{self.info.file}: {self.where} holds more than the {self.info.bytes} bytes "
                "the manifest records; corrupt or from another build, not using it"
            )
        if count == 0 and len(buffer) and not self.verified:
            self._verify()
        return count

    def _verify(self) -> None:
        if self._count != self.info.bytes:
            raise ShardVerificationError(
                f"{self.info.file}: {self.where} ended after {self._count} of the "
                f"{self.info.bytes} bytes the manifest records; truncated, not using it"
            )
        digest = self._digest.hexdigest()
        if digest != self.info.sha256:
            raise ShardVerificationError(
                f"{self.info.file}: sha256 of {self.where} is {digest[:12]}…, the manifest "
                f"records {self.info.sha256[:12]}…; corrupt copy, not using it"
            )
        self.verified = True

    def finish(self) -> None:
        """Read whatever is left and verify; raises :class:`ShardVerificationError`."""
        while not self.verified and self.read(CHUNK_BYTES):
            pass
        if not self.verified:
            self._verify()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_verified(source: ShardSource, info: ShardInfo) -> VerifiedStream:
    """Stream shard ``info.file`` from ``source``, verified against ``info`` at its end."""
    return VerifiedStream(source.open(info.file), info, source.describe(info.file))


def stage_shard(
    source: ShardSource,
    info: ShardInfo,
    tar_path: Path,
    index: IndexDigest,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Download shard ``info`` to ``tar_path`` with its index beside it, verified.

    The tar is written under a temporary name; its size and sha256 are
    checked against ``info``, and the index built from the tar's members
    against ``index`` (the digest of the index file at the source), before
    the index and then the tar get their final names. Any failure removes
    the temporary file and raises (a ``UserError`` saying which shard).
    """
    tar_path = Path(tar_path)
    with atomic_file(tar_path) as handle:
        with contextlib.closing(open_verified(source, info)) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                if should_stop():
                    raise StagingCancelled
                handle.write(chunk)
            stream.finish()
        handle.flush()
        members = iter_members(Path(handle.name))
        index_text = build_index(member.as_tuple() for member in members)
        if IndexDigest.of(index_text.encode("utf-8")) != index:
            raise ShardVerificationError(
                f"{info.file}: its index file does not describe the verified tar; "
                f"the copy at {source.describe(info.file)} has a stale or corrupt .idx"
            )
        # The index first: a tar under its final name always has its index.
        write_text_atomic(tar_path.with_suffix(".idx"), index_text)
