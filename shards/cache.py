"""A bounded cache of remote shards on local disk, verified before use, shared by a rank.

DALI and the sample reader read local files, so the shards of a remote location
(:mod:`shards.remote`) are staged into a cache directory: on the first read of
each (:meth:`ShardCache.read`, in whatever process reads), and ahead of it, in
the order the epoch reads them (:meth:`ShardCache.prefetch`, in threads of the
process that owns the directory). fsspec moves the bytes; this module decides
what may be used and what stays:

- Verified: a shard is written under a hidden temporary name while its size and
  sha256 are compared with the manifest, and the index built from its members
  must be the one the loader read; only then does it get its final name,
  ``<stem>.<sha256[:16]>.<index sha256[:8]>.tar``. A file under such a name is
  verified content, which later runs reuse. A mismatch raises
  :class:`ShardVerificationError` naming the shard, and the temporary goes: a
  bad copy is never read and never left behind.
- Bounded: every file of the directory counts, and a download reserves its full
  size before it starts (its temporary is extended to it), so the directory
  never holds more than ``max_bytes``. Room is made by evicting the least
  recently used shards; a shard is never evicted while it is read (readers hold
  a shared flock on it, which eviction's exclusive one cannot take).
- Shared without messages: the directory is the state (sizes, last use as the
  mtime, readers as flocks), changed under an exclusive lock of ``.state``, so
  DataLoader workers and the main process use one cache. A shard staged ahead
  and not read yet has an mtime far in the future (:data:`AHEAD` plus its place
  in the order): prefetching never evicts it and never lets such shards crowd
  out the ``working_bytes`` the reads in progress need; a reader that needs room
  takes the one needed last first. A read sets the mtime to now.
- Owned by one process, whose pid is in ``.lock``, flocked: give each rank its
  own directory; the loaders of one process (train and val) share it.
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
from shards.remote import CHUNK_BYTES, ShardSource, read_index, reading
from shards.writer import ShardInfo

LOCK_NAME, STATE_NAME = ".lock", ".state"
AHEAD = 4_000_000_000  # seconds: an mtime in 2096, which no file read today has
POLL_SECONDS = 0.05
TOUCH_SECONDS = 1.0  # a process marks a shard as used at most this often
DEFAULT_PREFETCH_THREADS = 2
DEFAULT_SPACE_WAIT_SECONDS = 30.0
_THREADS = threading.Lock()  # this process's threads take turns at the state


def _renew_threads_lock() -> None:
    """A forked child starts with a free lock (the parent's may be held by a thread it lacks)."""
    global _THREADS
    _THREADS = threading.Lock()


os.register_at_fork(after_in_child=_renew_threads_lock)


class ShardVerificationError(UserError):
    """A shard whose bytes do not match the manifest's size and sha256, or its index; unused."""


class StagingCancelled(Exception):
    """A prefetch gave up: the cache closed, or a new epoch's order replaced its own."""


class ShardCache:
    """Shards ``shards`` (one split's, addressed by number) of ``source`` staged in
    ``directory`` (None: a temporary directory, removed on :meth:`close` or at exit), at
    most ``max_bytes``. ``indexes``: digests of the index files the loader read (fetched
    when needed if None). Picklable: a worker process reads through its copy."""

    def __init__(
        self,
        source: ShardSource,
        shards: Sequence[ShardInfo],
        directory: str | Path | None,
        max_bytes: int,
        indexes: Sequence[IndexDigest] | None = None,
        working_bytes: int | None = None,
        prefetch_threads: int = DEFAULT_PREFETCH_THREADS,
        space_wait_seconds: float = DEFAULT_SPACE_WAIT_SECONDS,
    ):
        self.source, self.shards, self.max_bytes = source, tuple(shards), int(max_bytes)
        largest = max((info.bytes for info in self.shards), default=0)
        if self.max_bytes < 2 * largest:
            raise UserError(
                f"cache size {self.max_bytes} bytes is too small: it must hold at least two "
                f"shards (the largest is {largest} bytes); raise --cache-size"
            )
        self.working_bytes = 2 * largest if working_bytes is None else int(working_bytes)
        self.prefetch_threads, self.space_wait_seconds = prefetch_threads, space_wait_seconds
        self._finalizer = None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="alexpipe-shard-cache-")
            self._finalizer = weakref.finalize(self, _remove_directory, directory, os.getpid())
        self.directory = Path(directory).expanduser()
        self._indexes = list(indexes) if indexes is not None else [None] * len(self.shards)
        self._paths: list[Path | None] = [None] * len(self.shards)
        self._touched: dict[int, float] = {}
        self._generation = 0  # of the prefetch order; a new order cancels the old one's work
        self._pool: ThreadPoolExecutor | None = None
        self._owner = _claim(self.directory)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_finalizer": None, "_pool": None, "_owner": None}

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def index(self, number: int) -> IndexDigest:
        """The digest of shard ``number``'s index, which its staged copy is checked against."""
        if self._indexes[number] is None:
            text = read_index(self.source, self.shards[number].file)
            self._indexes[number] = IndexDigest.of(text.encode("ascii"))
        return self._indexes[number]

    def path(self, number: int) -> Path:
        """Where shard ``number`` is once staged (it may not be there)."""
        if self._paths[number] is None:
            info, index = self.shards[number], self.index(number)
            name = f"{info.file.removesuffix('.tar')}.{info.sha256[:16]}.{index.sha256[:8]}.tar"
            self._paths[number] = self.directory / name
        return self._paths[number]

    def read(self, number: int, start: int, size: int) -> bytes:
        """``size`` bytes at ``start`` of shard ``number``, which is staged first if needed."""
        path = self.path(number)
        while True:
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._stage(number)
                continue
            try:
                # No eviction during the read. Not blocking: an eviction in progress (or a
                # worker forked meanwhile that inherited its lock) means it is going.
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

    def fetch(self, number: int) -> Path:
        """Stage shard ``number`` if it is not there, mark it used, and return its path."""
        self.read(number, 0, 0)
        return self.path(number)

    def bytes_used(self) -> int:
        """Bytes of every file in the directory (staged shards, downloads' reservations)."""
        return sum(status.st_size for _path, status in _files(self.directory))

    def prefetch(self, order: Sequence[int]) -> None:
        """Stage shards ``order`` (numbers, as an epoch first reads them) in the background,
        as far as the cache allows; replaces the previous order. Staged shards of ``order``
        count as staged ahead until read."""
        self._generation += 1
        generation, self._touched, now = self._generation, {}, time.time()
        places = {self.path(number).name: place for place, number in enumerate(order)}
        with self._state():
            for path, status in _files(self.directory):
                if path.name in places:
                    os.utime(path, (now, AHEAD + places[path.name]))
                elif status.st_mtime >= AHEAD:
                    os.utime(path, (now, now))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch_threads, "shard-prefetch")
        for place, number in enumerate(order):
            self._pool.submit(self._prefetch, number, place, generation)

    def close(self) -> None:
        """Stop prefetching (downloads in flight are abandoned) and let go of the directory
        (a temporary one is removed). Reading again stages on demand."""
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

    # --- staging -------------------------------------------------------------------------------

    def _prefetch(self, number: int, place: int, generation: int) -> None:
        def cancelled() -> bool:
            return generation != self._generation

        # Anything wrong with the shard is left to its first read, which stages it again and
        # stops the run with the error.
        with contextlib.suppress(Exception):
            if not cancelled():
                self._stage(number, place, cancelled)

    def _stage(
        self, number: int, place: int | None = None, cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Download, verify and name shard ``number``, unless it is there. If another thread or
        process is staging it, wait for that (on demand) or leave it (``place`` given: staged
        ahead, as the ``place``-th of the prefetch order)."""
        info, path = self.shards[number], self.path(number)
        # The stager's pid in the name tells a live download from one a killed worker left.
        partial = path.with_name(f".{path.name}{TEMPORARY_MARKER}{os.getpid()}")
        deadline = time.monotonic() + self.space_wait_seconds
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
                deadline = time.monotonic() + self.space_wait_seconds
            elif place is None and time.monotonic() > deadline:
                raise UserError(
                    f"shard cache {self.directory} ({self.max_bytes} bytes) has had no room for "
                    f"{info.file} ({info.bytes} bytes) for {self.space_wait_seconds:.0f} s; "
                    "raise --cache-size"
                )
            time.sleep(POLL_SECONDS)
        try:
            with handle:
                self._download(info, handle, cancelled)
            self._check_index(number, partial)
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

    def _check_index(self, number: int, tar: Path) -> None:
        """The index the loader read must be the one the verified tar's members give."""
        text = build_index(member.as_tuple() for member in iter_members(tar))
        if IndexDigest.of(text.encode("ascii")) != self.index(number):
            name = self.shards[number].file
            raise ShardVerificationError(
                f"{name}: its index file does not describe the verified tar; the copy at "
                f"{self.source.describe(index_name(name))} is stale or corrupt"
            )

    # --- the directory -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self):
        """Exclusive while it is held: among processes by a POSIX lock of ``.state`` (which,
        unlike a flock, a worker forked meanwhile does not inherit and keep), among this
        process's threads (which POSIX locks do not tell apart) by a lock of the process."""
        with _THREADS, open(self.directory / STATE_NAME, "a") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            yield

    def _make_room(self, needed: int, ahead: bool) -> bool:
        """Evict until ``needed`` more bytes fit; False if they cannot. With ``ahead``, shards
        staged ahead are kept, and they (downloads included) may not take the room of the
        reads in progress. Call with the state held."""
        files = _files(self.directory)
        free = self.max_bytes - sum(status.st_size for _path, status in files)
        if ahead:
            waiting = sum(s.st_size for p, s in files if s.st_mtime >= AHEAD or p.name[0] == ".")
            if waiting + needed > self.max_bytes - self.working_bytes:
                return False
        staged = [(path, status) for path, status in files if path.name[0] != "."]
        staged.sort(key=lambda item: _eviction_rank(item[1].st_mtime))
        for path, status in staged:
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


def _staging(directory: Path, name: str) -> bool:
    """Whether a live process is staging ``name`` (any shard for ""); downloads whose stager
    is gone are removed. Call with the state held."""
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


def _claim(directory: Path) -> IO[str] | None:
    """Lock ``directory`` for this process and clear what a dead owner left being written;
    None if this process holds it already."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        if owner == str(os.getpid()):
            return None
        raise UserError(
            f"cache directory {directory} is in use by another process (pid {owner}); "
            "give each process its own --cache-dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    remove_temporaries(directory)
    return handle


def _remove_directory(directory: str, pid: int) -> None:
    if os.getpid() == pid:  # not a forked worker's copy
        shutil.rmtree(directory, ignore_errors=True)
