"""A bounded cache of remote shards on local disk, verified before use, shared by a rank.

Readers read local files, so the shards of a remote location (:mod:`shards.remote`,
whose libraries move the bytes) are staged into a directory on their first read
(:meth:`ShardCache.read`, in whatever process reads) and ahead of it, in the order an
epoch reads them (:meth:`ShardCache.prefetch`). What may be used and what stays:

- Verified: a shard is written under a hidden temporary name while its size and sha256
  are checked, and its members must give the index the loader read; only then is it
  named ``<stem>.<sha256[:16]>.<index sha256[:8]>.tar`` (which later runs reuse).
- Bounded: every file counts, and a download reserves its whole size first. Room is
  made by evicting the least recently used shards, never one being read (readers hold
  a shared flock). A shard staged ahead and not read yet has an mtime far in the future
  (:data:`AHEAD` + its place): prefetching never evicts it, nor lets such shards take the
  ``working_bytes`` that reads in progress need; on demand, the one needed last goes.
- Shared: the directory is the state (sizes, last use as the mtime, readers as flocks),
  changed under a lock of ``.state``, so DataLoader workers share it with their process,
  which owns it (its pid in ``.lock``, flocked): one directory per rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from shards.atomic import TEMPORARY_MARKER, remove_temporaries
from shards.errors import UserError
from shards.index import IndexDigest, build_index
from shards.manifest import index_name
from shards.reader import iter_members
from shards.remote import CHUNK_BYTES, ShardSource, reading
from shards.writer import ShardInfo

LOCK_NAME, STATE_NAME = ".lock", ".state"
AHEAD = 4_000_000_000  # seconds: an mtime in 2096, which no file read today has
POLL_SECONDS = 0.05
TOUCH_SECONDS = 1.0  # a process marks a shard as used at most this often
PREFETCH_THREADS = 2
SPACE_WAIT_SECONDS = 30.0
# A lock per process for its threads: a forked child must not inherit one its parent holds.
_THREADS: dict[int, threading.Lock] = {}


class ShardVerificationError(UserError):
    """A shard whose bytes do not match the manifest's size and sha256, or its index; unused."""


class StagingCancelled(Exception):
    """A prefetch gave up: the cache closed, or a new epoch's order replaced its own."""


class ShardCache:
    """Shards ``shards`` of ``source`` (one split's, by number, with the ``indexes`` the loader
    read) staged in ``directory`` (None: a temporary one, removed when the cache closes), at
    most ``max_bytes``. Picklable: a worker process reads through its copy."""

    def __init__(
        self,
        source: ShardSource,
        shards: Sequence[ShardInfo],
        indexes: Sequence[IndexDigest],
        directory: str | Path | None,
        max_bytes: int,
        working_bytes: int | None = None,
    ):
        self.source, self.shards, self.indexes = source, tuple(shards), tuple(indexes)
        largest = max(info.bytes for info in self.shards)
        if max_bytes < 2 * largest:
            raise UserError(
                f"cache size {max_bytes} bytes is too small: it must hold at least two shards "
                f"(the largest is {largest} bytes); raise --cache-size"
            )
        self.max_bytes, self.working_bytes = int(max_bytes), working_bytes or 2 * largest
        self._finalizer = None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="alexpipe-shard-cache-")
            self._finalizer = weakref.finalize(self, _remove_directory, directory, os.getpid())
        self.directory = Path(directory).expanduser()
        self.paths = tuple(
            self.directory / f"{info.file[:-4]}.{info.sha256[:16]}.{index.sha256[:8]}.tar"
            for info, index in zip(self.shards, self.indexes, strict=True)
        )
        self._touched: dict[int, float] = {}
        self._generation = 0  # of the prefetch order; a new order cancels the old one's work
        self._pool: ThreadPoolExecutor | None = None
        self._owner = _claim(self.directory)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_finalizer": None, "_pool": None, "_owner": None}

    def read(self, number: int, start: int, size: int) -> bytes:
        """``size`` bytes at ``start`` of shard ``number``, which is staged first if needed."""
        while True:
            try:
                descriptor = os.open(self.paths[number], os.O_RDONLY)
            except FileNotFoundError:
                self._stage(number)
                continue
            try:
                # Not blocking: an eviction holds it (or a worker forked meanwhile inherited
                # that lock), so it is going; look again.
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                if os.fstat(descriptor).st_nlink:  # else evicted between the open and the lock
                    now = time.monotonic()
                    if now - self._touched.get(number, -TOUCH_SECONDS) >= TOUCH_SECONDS:
                        os.utime(descriptor)  # used now (and no longer "staged ahead")
                        self._touched[number] = now
                    return os.pread(descriptor, size, start)
            except BlockingIOError:
                time.sleep(POLL_SECONDS)
            finally:
                os.close(descriptor)

    def prefetch(self, order: Sequence[int]) -> None:
        """Stage shards ``order`` (numbers, as an epoch first reads them) in the background, as
        far as the cache allows; replaces the previous order. Those already there count as
        staged ahead until read."""
        self._generation += 1
        generation, self._touched, now = self._generation, {}, time.time()
        places = {self.paths[number].name: place for place, number in enumerate(order)}
        with self._state():
            for path, status in _files(self.directory):
                if path.name in places:
                    os.utime(path, (now, AHEAD + places[path.name]))
                elif status.st_mtime >= AHEAD:
                    os.utime(path, (now, now))
        self._pool = self._pool or ThreadPoolExecutor(PREFETCH_THREADS, "shard-prefetch")
        for place, number in enumerate(order):
            self._pool.submit(self._prefetch, number, place, generation)

    def close(self) -> None:
        """Stop prefetching (abandoning downloads in flight) and let go of the directory (a
        temporary one is removed). Reading again stages on demand."""
        self._generation += 1
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._state():  # what a killed worker was staging
            _staging(self.directory, "")
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        if self._finalizer is not None:
            self._finalizer()

    def _prefetch(self, number: int, place: int, generation: int) -> None:
        def cancelled() -> bool:
            return generation != self._generation

        # What is wrong with a shard is left to its first read, which stages it again and stops.
        with contextlib.suppress(Exception):
            if not cancelled():
                self._stage(number, place, cancelled)

    def _stage(
        self, number: int, place: int | None = None, cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Download, verify and name shard ``number``, unless it is there. If another thread or
        process stages it, wait for that (on demand) or leave it (``place`` given: staging it
        ahead, as the ``place``-th of the prefetch order)."""
        info, path = self.shards[number], self.paths[number]
        # The stager's pid in the name tells a live download from one a killed worker left.
        partial = path.with_name(f".{path.name}{TEMPORARY_MARKER}{os.getpid()}")
        deadline = time.monotonic() + SPACE_WAIT_SECONDS
        while True:
            with self._state():
                if path.exists():
                    return
                busy = _staging(self.directory, path.name)
                if not busy and self._make_room(info.bytes, ahead=place is not None):
                    handle = open(partial, "xb")
                    handle.truncate(info.bytes)  # the room of the whole download, reserved
                    break
            if cancelled() or (busy and place is not None):
                raise StagingCancelled
            if busy:
                deadline = time.monotonic() + SPACE_WAIT_SECONDS
            elif place is None and time.monotonic() > deadline:
                raise UserError(
                    f"shard cache {self.directory} ({self.max_bytes} bytes) has had no room for "
                    f"{info.file} ({info.bytes} bytes) for {SPACE_WAIT_SECONDS:.0f} s; "
                    "raise --cache-size"
                )
            time.sleep(POLL_SECONDS)
        try:
            with handle:
                self._download(info, handle, cancelled)
            text = build_index(member.as_tuple() for member in iter_members(partial))
            if IndexDigest.of(text.encode("ascii")) != self.indexes[number]:
                raise ShardVerificationError(
                    f"{info.file}: its index file does not describe the verified tar; the copy "
                    f"at {self.source.describe(index_name(info.file))} is stale or corrupt"
                )
            if place is not None:
                os.utime(partial, (time.time(), AHEAD + place))
            os.rename(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _download(self, info: ShardInfo, handle: IO[bytes], cancelled: Callable[[], bool]) -> None:
        """Write shard ``info`` from the source into ``handle``, checking size and sha256."""
        where = self.source.describe(info.file)
        digest, count = hashlib.sha256(), 0
        with contextlib.closing(self.source.open(info.file)) as stream:
            while True:
                with reading(where):
                    chunk = stream.read(CHUNK_BYTES)
                if not chunk:
                    break
                count += len(chunk)
                if count > info.bytes:
                    raise ShardVerificationError(
                        f"{info.file}: {where} holds more than the {info.bytes} bytes the "
                        "manifest records; corrupt or from another build, not using it"
                    )
                if cancelled():
                    raise StagingCancelled
                digest.update(chunk)
                handle.write(chunk)
        if count < info.bytes:
            raise ShardVerificationError(
                f"{info.file}: {where} ended after {count} of the {info.bytes} bytes the "
                "manifest records; truncated, not using it"
            )
        if (actual := digest.hexdigest()) != info.sha256:
            raise ShardVerificationError(
                f"{info.file}: sha256 of {where} is {actual[:12]}…, the manifest records "
                f"{info.sha256[:12]}…; corrupt copy, not using it"
            )
        handle.flush()
        os.fsync(handle.fileno())  # a final name must never hold what a power loss cut short

    @contextlib.contextmanager
    def _state(self):
        """Exclusive while held: among processes by a POSIX lock of ``.state`` (which, unlike
        a flock, a worker forked meanwhile does not inherit and keep), among this process's
        threads (which POSIX locks do not tell apart) by the process's lock."""
        threads = _THREADS.setdefault(os.getpid(), threading.Lock())
        with threads, open(self.directory / STATE_NAME, "a") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            yield

    def _make_room(self, needed: int, ahead: bool) -> bool:
        """Evict until ``needed`` more bytes fit; False if they cannot. With ``ahead``, shards
        staged ahead are kept, and they (and downloads) may not take the room of the reads in
        progress. Call with the state held."""
        files = _files(self.directory)
        free = self.max_bytes - sum(status.st_size for _path, status in files)
        if ahead:
            waiting = sum(s.st_size for p, s in files if s.st_mtime >= AHEAD or p.name[0] == ".")
            if waiting + needed > self.max_bytes - self.working_bytes:
                return False
        staged = [(path, status) for path, status in files if path.name[0] != "."]
        for path, status in sorted(staged, key=lambda item: _eviction_rank(item[1].st_mtime)):
            if free >= needed or (ahead and status.st_mtime >= AHEAD):
                break
            if _evict(path):
                free += status.st_size
        return free >= needed


def _files(directory: Path) -> list[tuple[Path, os.stat_result]]:
    found = []
    for entry in os.scandir(directory):
        with contextlib.suppress(FileNotFoundError):  # a failed download's temporary, just gone
            if entry.is_file(follow_symlinks=False):
                found.append((Path(entry.path), entry.stat(follow_symlinks=False)))
    return found


def _eviction_rank(mtime: float) -> tuple[bool, float]:
    """Least recently used first; then (on demand only) those staged ahead, needed last first."""
    return (mtime >= AHEAD, -mtime if mtime >= AHEAD else mtime)


def _evict(path: Path) -> bool:
    """Remove a staged shard, unless someone is reading it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def _staging(directory: Path, name: str) -> bool:
    """Whether a live process stages ``name`` (any shard for ""); downloads whose stager is
    gone are removed. Call with the state held."""
    busy = False
    for partial in directory.glob(f".{name}*{TEMPORARY_MARKER}*"):
        pid = partial.name.rsplit(TEMPORARY_MARKER, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)
        else:
            busy = True
    return busy


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def _claim(directory: Path) -> IO[str] | None:
    """Lock ``directory`` for this process and clear what a dead owner left being written;
    None if this process holds it already (its train and val loaders share it)."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with handle:
            handle.seek(0)
            if (owner := handle.read().strip()) == str(os.getpid()):
                return None
        raise UserError(
            f"cache directory {directory} is in use by another process (pid {owner}); "
            "give each process its own --cache-dir"
        ) from None
    handle.truncate(0)
    print(os.getpid(), file=handle, flush=True)
    remove_temporaries(directory)
    return handle


def _remove_directory(directory: str, pid: int) -> None:
    if os.getpid() == pid:  # not a forked worker's copy
        shutil.rmtree(directory, ignore_errors=True)
