"""A bounded cache of remote shards on local disk, verified before use, shared by a rank.

Readers read local files, so the shards of a remote location (:mod:`shards.remote`,
whose libraries move the bytes) are staged into a directory on their first read
(:meth:`ShardCache.read`, in any process) and ahead of it, in the order an epoch reads
them (:meth:`ShardCache.prefetch`). A shard is written under a hidden temporary name
while its size and sha256 are checked, and its members must give the index the loader
read; only then is it named ``<stem>.<sha256[:16]>.<index sha256[:8]>.tar``, which
later runs reuse. Every file counts against ``max_bytes``, a download reserves its
whole size first, and room is made by evicting the least recently used shards, never
one being read (readers hold a shared flock). A shard staged ahead and not yet read has
an mtime far in the future (:data:`AHEAD` + its place): prefetching never evicts it, nor
lets such shards take the ``working_bytes`` that reads in progress need; on demand, the
one needed last goes. The directory is the state (sizes, last use as the mtime, readers
as flocks), changed under a lock of ``.state``, so DataLoader workers share it with the
process that owns it (its pid in ``.lock``, flocked): one directory per rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from shards.atomic import TEMPORARY_MARKER
from shards.errors import UserError
from shards.index import IndexDigest, build_index
from shards.manifest import index_name
from shards.reader import ShardFormatError
from shards.remote import CHUNK_BYTES, ShardSource, reading
from shards.scan import scan_shard
from shards.writer import ShardInfo

LOCK_NAME, STATE_NAME = ".lock", ".state"
# The cache's own files; anything else in the directory is neither counted nor touched.
STAGED = r"[A-Za-z0-9][\w.-]*\.[0-9a-f]{16}\.[0-9a-f]{8}\.tar"
OURS = re.compile(rf"{STAGED}|\.{STAGED}{re.escape(TEMPORARY_MARKER)}[0-9]+|\.lock|\.state")
AHEAD = 4_000_000_000  # seconds: an mtime in 2096, which no file read today has
POLL_SECONDS = 0.05
TOUCH_SECONDS = 1.0  # a process marks a shard as used at most this often
PREFETCH_THREADS = 2
SPACE_WAIT_SECONDS = 30.0
# A lock per process for its threads: a forked child must not inherit one its parent holds.
_THREADS: dict[int, threading.Lock] = {}


def least_working_bytes(shards: Sequence[ShardInfo]) -> int:
    """The least room a shard cache accepts: two of its largest shards."""
    return 2 * max(info.bytes for info in shards)


class ShardVerificationError(UserError):
    """A shard whose bytes do not match the manifest's size and sha256, or its index; unused."""


class StagingCancelled(Exception):
    """A prefetch gave up: the cache closed, or a new epoch's order replaced its own."""


class ShardCache:
    """Shards of ``source`` (one split's, by number, with the ``indexes`` the loader read) in
    ``directory`` (None: a temporary one), at most ``max_bytes``. Picklable, for workers."""

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
        self.working_bytes = working_bytes or least_working_bytes(self.shards)
        if max_bytes < self.working_bytes:
            raise UserError(
                f"cache size {describe_bytes(max_bytes)} is too small for the shards of "
                f"{source.location}: those a shuffle window and the batches in flight span can "
                f"take {describe_bytes(self.working_bytes)}; raise --cache-size to at least that"
            )
        self.max_bytes = int(max_bytes)
        self._finalizer = None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="alexpipe-shard-cache-")
            self._finalizer = weakref.finalize(self, _remove_directory, directory, os.getpid())
        self.directory = Path(directory).expanduser()
        self.paths = tuple(
            self.directory
            / f"{info.file.removesuffix('.tar')}.{info.sha256[:16]}.{index.sha256[:8]}.tar"
            for info, index in zip(self.shards, self.indexes, strict=True)
        )
        self._touched: dict[int, float] = {}
        self._generation = 0  # of the prefetch order; a new order cancels the old one's work
        self._tasks: queue.SimpleQueue | None = None  # of the prefetch threads
        self._threads: list[threading.Thread] = []
        self._owner = _claim(self.directory)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_finalizer": None, "_tasks": None, "_threads": [], "_owner": None}

    def read(self, number: int, start: int, size: int) -> bytes:
        """``size`` bytes at ``start`` of shard ``number``, which is staged first if needed."""
        while True:
            try:
                descriptor = os.open(self.paths[number], os.O_RDONLY)
            except FileNotFoundError:
                self._stage(number)
                continue
            try:
                # Not blocking: an eviction (or a worker forked meanwhile) holds it; look again.
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
        if self._tasks is None:
            # Daemon threads: a program that ends without close() must not wait for them.
            self._tasks = queue.SimpleQueue()
            self._threads = [
                threading.Thread(target=self._prefetch, args=(self._tasks,), daemon=True)
                for _ in range(PREFETCH_THREADS)
            ]
            for thread in self._threads:
                thread.start()
        for place, number in enumerate(order):
            self._tasks.put((number, place, generation))

    def close(self) -> None:
        """Stop prefetching (abandoning downloads in flight) and let go of the directory (a
        temporary one is removed with what it holds)."""
        self._generation += 1
        for thread in self._threads:
            self._tasks.put(None)  # each thread ends at one, after what it stages is cancelled
            thread.join(timeout=SPACE_WAIT_SECONDS)
        self._tasks, self._threads = None, []
        if self.directory.is_dir():
            with self._state():  # what a killed worker was staging
                _staging(self.directory, "")
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        if self._finalizer is not None:
            self._finalizer()

    def _prefetch(self, tasks: queue.SimpleQueue) -> None:
        """A prefetch thread: stages the tasks of the current order, skips those of old ones."""
        while (task := tasks.get()) is not None:
            number, place, generation = task

            def cancelled(generation=generation) -> bool:
                return generation != self._generation

            # What is wrong with a shard is left to its first read, which stages it again
            # and stops the run.
            with contextlib.suppress(Exception):
                if not cancelled():
                    self._stage(number, place, cancelled)

    def _stage(
        self, number: int, place: int | None = None, cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Download, verify and name shard ``number`` unless it is there; if another stages it,
        wait (on demand) or leave it (``place``: staging ahead, the order's ``place``-th)."""
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
            text = build_index(self._verified_members(info, partial))
            if IndexDigest.of(text) != self.indexes[number]:
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
        """Write shard ``info`` from the source into ``handle``, checking its size."""
        where = self.source.describe(info.file)
        count = 0
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
                handle.write(chunk)
        if count < info.bytes:
            problem = f"{where} ended after {count} of the {info.bytes} bytes the manifest records"
            raise ShardVerificationError(f"{info.file}: {problem}; truncated, not using it")
        handle.flush()
        os.fsync(handle.fileno())  # a final name must never hold what a power loss cut short

    def _verified_members(self, info: ShardInfo, partial: Path) -> list:
        """The tar members of the downloaded ``partial``, once its sha256 is the manifest's:
        hash and headers in one pass of :func:`shards.scan.scan_shard`: 40 CPU ms for a
        1,000-sample shard of real photographs (23 MB), against 109 for sha256 while
        downloading plus tarfile's parse of the headers."""
        scan = scan_shard(partial, (), lambda key, parts: None)
        if scan.sha256 != info.sha256:
            where = self.source.describe(info.file)
            problem = (
                f"sha256 of {where} is {scan.sha256[:12]}…, the manifest records "
                f"{info.sha256[:12]}…"
            )
            raise ShardVerificationError(f"{info.file}: {problem}; corrupt copy, not using it")
        if scan.member_error is not None:
            raise ShardFormatError(scan.member_error)
        return scan.members

    @contextlib.contextmanager
    def _state(self):
        """Exclusive: among processes by a POSIX lock of ``.state`` (unlike a flock, a worker
        forked meanwhile does not keep it), among this process's threads by its own lock."""
        threads = _THREADS.setdefault(os.getpid(), threading.Lock())
        with threads, open(self.directory / STATE_NAME, "a") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            yield

    def _make_room(self, needed: int, ahead: bool) -> bool:
        """Evict until ``needed`` more bytes fit (False: they cannot); ``ahead``: keeping shards
        staged ahead, which with downloads may not take reads' ``working_bytes``. State held."""
        files = _files(self.directory)
        free = self.max_bytes - sum(status.st_size for _path, status in files)
        if ahead:
            waiting = sum(s.st_size for p, s in files if s.st_mtime >= AHEAD or p.name[0] == ".")
            if waiting + needed > self.max_bytes - self.working_bytes:
                return False
        # Least recently used first; then (on demand only) those staged ahead, needed last first.
        staged = [(path, status) for path, status in files if path.name[0] != "."]
        staged.sort(key=lambda item: (item[1].st_mtime >= AHEAD, -abs(item[1].st_mtime - AHEAD)))
        for path, status in staged:
            if free >= needed or (ahead and status.st_mtime >= AHEAD):
                break
            if _evict(path):
                free += status.st_size
        return free >= needed


def _files(directory: Path) -> list[tuple[Path, os.stat_result]]:
    """The cache's own files in ``directory``, with their status."""
    found = []
    for entry in os.scandir(directory):
        with contextlib.suppress(FileNotFoundError):  # a failed download's temporary, just gone
            if OURS.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found.append((Path(entry.path), entry.stat(follow_symlinks=False)))
    return found


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
        if not OURS.fullmatch(partial.name):
            continue
        if _alive(int(partial.name.rsplit(TEMPORARY_MARKER, 1)[1])):
            busy = True
        else:
            partial.unlink(missing_ok=True)
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
    _staging(directory, "")
    return handle


def describe_bytes(count: int) -> str:
    """``1288490188`` -> ``"1288490188 bytes (1.20 GiB)"``."""
    return f"{count} bytes ({count / 2**30:.2f} GiB)"


def _remove_directory(directory: str, pid: int) -> None:
    if os.getpid() == pid:  # not a forked worker's copy
        shutil.rmtree(directory, ignore_errors=True)
