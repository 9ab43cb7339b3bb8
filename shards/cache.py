"""A bounded local cache of remote shards, verified before use and prefetched ahead of reading.

DALI (and our ``pread``-based readers) read local files, so shards from an
``http(s)://``, ``s3://`` or ``pipe:`` source are staged into ``cache_dir``
first. A shard is downloaded to a hidden temporary name, its size and sha256
are checked against the manifest and its index against the tar, and only
then does it get its final name; a corrupt copy raises
:class:`~shards.verified.ShardVerificationError` and leaves nothing behind
(:func:`~shards.verified.stage_shard`).

Bounded: every byte in the cache (staged shards, their ``.idx`` files and
downloads in flight, which reserve their full size before they start) counts
against ``max_bytes``. Room is made by evicting the least recently used
shards that nobody holds; a shard between :meth:`ShardCache.acquire` and
:meth:`ShardCache.release` is never evicted.

Prefetch: :meth:`ShardCache.prefetch` takes the order in which shards will be
acquired; background threads stage them in that order as far as the budget
allows, never evicting a shard that is held or that the order still needs
(so the prefetcher cannot throw away the next shard to make room for a later
one). :meth:`acquire` stages on demand whatever is not ready, and blocks
while a shard is being staged.

Files are named ``<shard stem>.<first 16 hex of its sha256>.tar`` (+ ``.idx``),
so a later run with the same cache directory reuses them; one process owns
a cache directory at a time (an exclusive lock): give each training process
its own (``shards.cache_dir``).

This module decides what is on disk and when: holding, prefetching and
evicting. Downloading and checking one shard is ``shards.verified``'s job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shards.cache_dir import cached_name, claim_cache_dir, leftover_shards, staged_bytes
from shards.errors import UserError
from shards.eviction import CacheEntry, eviction_order, victims_for_room
from shards.index import IndexDigest
from shards.manifest import Manifest
from shards.remote import ShardSource, read_index
from shards.verified import StagingCancelled, stage_shard
from shards.writer import ShardInfo

# Any plain name: only used to ask a source whether its files are local.
MANIFEST_PROBE = "manifest.json"
DEFAULT_PREFETCH_THREADS = 2
DEFAULT_SPACE_WAIT_SECONDS = 30.0
# Waits re-check their condition this often, so a missed wake-up costs little.
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class CacheStats:
    """Counters, for progress lines and tests."""

    bytes_used: int
    max_bytes: int
    shards_ready: int
    downloads: int
    hits: int
    evictions: int


class ShardCache:
    """Stage shards of ``manifest`` from ``source`` into ``cache_dir``, at most ``max_bytes``.

    ``acquire(name) -> Path`` returns the local tar (its index is
    ``path.with_suffix(".idx")``) and holds it until ``release(name)``; each
    acquire needs one release. For a local source, ``acquire`` returns the
    source's own file and nothing is copied. Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(
        self,
        source: ShardSource,
        manifest: Manifest,
        cache_dir: Path,
        max_bytes: int,
        prefetch_threads: int = DEFAULT_PREFETCH_THREADS,
        space_wait_seconds: float = DEFAULT_SPACE_WAIT_SECONDS,
    ):
        self.source = source
        self.cache_dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self.space_wait_seconds = space_wait_seconds
        self._infos = {info.file: info for info in manifest.every_shard()}
        self._local = source.local_path(MANIFEST_PROBE) is not None
        self._condition = threading.Condition()
        self._entries: dict[str, CacheEntry] = {}
        self._failures: dict[str, BaseException] = {}
        self._plan: dict[str, int] = {}  # shard -> position in the prefetch order
        self._consumed: set[str] = set()  # shards of the plan acquired since it was set
        self._claimed: set[str] = set()  # picked by a prefetch thread, not yet reserved
        self._indexes: dict[str, IndexDigest] = {}  # shard -> its index, as first told
        self._clock = 0
        self._counts = {"downloads": 0, "hits": 0, "evictions": 0}
        self._threads: list[threading.Thread] = []
        self._prefetch_threads = prefetch_threads
        self._closed = False
        self._lock_handle = None
        if self._local:
            return
        largest = max((info.bytes for info in self._infos.values()), default=0)
        if self.max_bytes < 2 * largest:
            raise UserError(
                f"cache size {self.max_bytes} bytes is too small: it must hold at least two "
                f"shards (the largest is {largest} bytes); raise --cache-size"
            )
        self._lock_handle = claim_cache_dir(self.cache_dir)
        self._adopt_existing()

    # --- setup ---------------------------------------------------------------------------------

    def _adopt_existing(self) -> None:
        """Count shards a previous run left (oldest first in LRU order); drop broken ones."""
        for name, info, total in leftover_shards(self.cache_dir, self._infos.values()):
            self._clock += 1
            shard = info.file if info is not None else None
            self._entries[name] = CacheEntry(name, shard, total, ready=True, last_used=self._clock)
        with self._condition:
            # Room for nothing more: evicts, oldest first, until what is there fits.
            self._make_room(0, protect_plan=False)

    # --- public API ----------------------------------------------------------------------------

    def info(self, name: str) -> ShardInfo:
        """The manifest entry of shard ``name``."""
        try:
            return self._infos[name]
        except KeyError:
            raise UserError(f"shard {name!r} is not in the manifest") from None

    def path_of(self, name: str) -> Path:
        """Where shard ``name`` lives when it is ready (it may not be there yet)."""
        info = self.info(name)
        if self._local:
            return self.source.local_path(name)
        return self.cache_dir / cached_name(info)

    def know_indexes(self, indexes: Mapping[str, IndexDigest]) -> None:
        """Digests of index files already read from the source (a loader reads them to build
        its table): staging checks the index it builds from a tar against these instead of
        fetching the file again. The first digest given for a shard is kept."""
        with self._condition:
            for name, index in indexes.items():
                self._indexes.setdefault(name, index)

    def known_index(self, name: str) -> IndexDigest | None:
        """The digest staged copies of shard ``name`` are checked against, if given."""
        with self._condition:
            return self._indexes.get(name)

    def prefetch(self, order: Iterable[str]) -> None:
        """Stage shards in the background in ``order`` (the order they will be acquired).

        Replaces any earlier order. Shards already acquired under an earlier
        order count as used; repeated names are staged once.
        """
        names = list(dict.fromkeys(order))
        for name in names:
            self.info(name)
        if self._local:
            return
        with self._condition:
            self._check_open()
            self._plan = {name: position for position, name in enumerate(names)}
            self._consumed = set()
            self._condition.notify_all()
            while len(self._threads) < self._prefetch_threads:
                thread = threading.Thread(
                    target=self._prefetch_loop, name="shard-prefetch", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def acquire(self, name: str) -> Path:
        """The local path of shard ``name``, staged and verified; held until :meth:`release`."""
        info = self.info(name)
        if self._local:
            return self.source.local_path(name)
        file_name = cached_name(info)
        while True:
            with self._condition:
                self._check_open()
                if name in self._failures:
                    self._consumed.add(name)  # reported: the prefetcher must not retry it
                    raise self._failures.pop(name)
                entry = self._entries.get(file_name)
                if entry is not None and entry.ready:
                    entry.pins += 1
                    self._touch(entry)
                    self._consumed.add(name)
                    self._counts["hits"] += 1
                    return self.cache_dir / file_name
                if entry is not None:  # being staged by a prefetch thread
                    self._condition.wait(POLL_SECONDS)
                    continue
            # Not marked consumed while we stage it: it stays first in the prefetch
            # order, which keeps prefetch threads from taking the room it needs.
            try:
                staged = self._stage(info, demand=True)
            except BaseException:
                with self._condition:
                    self._consumed.add(name)
                raise
            if staged:
                return self.cache_dir / file_name

    def release(self, name: str) -> None:
        """Let go of shard ``name`` (one :meth:`acquire`); it may now be evicted."""
        info = self.info(name)
        if self._local:
            return
        with self._condition:
            entry = self._entries.get(cached_name(info))
            if entry is None or entry.pins == 0:
                raise ValueError(f"release({name!r}) without a matching acquire")
            entry.pins -= 1
            self._touch(entry)
            self._condition.notify_all()

    def stats(self) -> CacheStats:
        """Bytes used and counters so far."""
        with self._condition:
            return CacheStats(
                bytes_used=self._bytes_used(),
                max_bytes=self.max_bytes,
                shards_ready=sum(entry.ready for entry in self._entries.values()),
                **self._counts,
            )

    def close(self) -> None:
        """Stop prefetching (in-flight downloads are abandoned) and unlock the directory."""
        with self._condition:
            if self._closed:
                return
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._lock_handle is not None:
            self._lock_handle.close()

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError(
            "a ShardCache belongs to one process (threads, a directory lock); "
            "pass the paths it returns to other processes instead"
        )

    # --- staging -------------------------------------------------------------------------------

    def _stage(self, info: ShardInfo, demand: bool) -> bool:
        """Stage ``info``; True when done (and, on demand, held). False: someone else did it."""
        file_name = cached_name(info)
        with self._condition:
            if self._not_to_stage(info, file_name, demand):
                return False
            index = self._indexes.get(info.file)
        if index is None:  # nobody read it yet: fetch it
            index = IndexDigest.of(read_index(self.source, info.file).encode("ascii"))
        needed = staged_bytes(info, index)
        deadline = time.monotonic() + self.space_wait_seconds
        with self._condition:
            while True:
                if self._not_to_stage(info, file_name, demand):
                    return False
                # Prefetch threads reserve in plan order, or a later shard could take
                # the room the next one needs.
                in_turn = demand or self._missing_in_plan()[:1] == [info.file]
                if in_turn and self._make_room(needed, protect_plan=not demand):
                    break
                if demand and time.monotonic() > deadline:
                    raise UserError(self._too_small_message(info, needed))
                self._condition.wait(POLL_SECONDS)
            self._claimed.discard(info.file)
            entry = CacheEntry(file_name, info.file, needed, ready=False)
            self._entries[file_name] = entry
            self._counts["downloads"] += 1
        try:
            stage_shard(
                self.source,
                info,
                self.cache_dir / file_name,
                index,
                should_stop=lambda: self._closed,
            )
        except BaseException as error:
            with self._condition:
                del self._entries[file_name]
                if not demand and not isinstance(error, StagingCancelled):
                    self._failures[info.file] = error
                self._condition.notify_all()
            raise
        with self._condition:
            entry.ready = True
            self._touch(entry)
            if demand:
                entry.pins += 1
                self._consumed.add(info.file)
            self._condition.notify_all()
        return True

    def _not_to_stage(self, info: ShardInfo, file_name: str, demand: bool) -> bool:
        """Someone else staged it, or (prefetching) it is no longer wanted. Condition held."""
        self._check_open(cancel=not demand)
        unwanted = not demand and (info.file in self._consumed or info.file not in self._plan)
        if file_name in self._entries or unwanted:
            self._claimed.discard(info.file)
            return True
        return False

    def _prefetch_loop(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (name := self._next_to_prefetch()) is None:
                    self._condition.wait(POLL_SECONDS)
                if self._closed:
                    return
                self._claimed.add(name)
            try:
                self._stage(self._infos[name], demand=False)
            except StagingCancelled:
                return
            except BaseException as error:  # kept for acquire() to raise
                with self._condition:
                    self._claimed.discard(name)
                    self._failures.setdefault(name, error)
                    self._condition.notify_all()

    def _missing_in_plan(self) -> list[str]:
        """Shards of the prefetch order still to stage, in order."""
        return [
            name
            for name in self._plan  # dicts keep the order
            if name not in self._consumed
            and name not in self._failures
            and cached_name(self._infos[name]) not in self._entries
        ]

    def _next_to_prefetch(self) -> str | None:
        return next((name for name in self._missing_in_plan() if name not in self._claimed), None)

    # --- bookkeeping (call with the condition held) --------------------------------------------

    def _check_open(self, cancel: bool = False) -> None:
        if self._closed:
            if cancel:
                raise StagingCancelled
            raise UserError("the shard cache is closed")

    def _touch(self, entry: CacheEntry) -> None:
        self._clock += 1
        entry.last_used = self._clock

    def _bytes_used(self) -> int:
        return sum(entry.bytes for entry in self._entries.values())

    def _eviction_order(self, protect_plan: bool) -> list[CacheEntry]:
        return eviction_order(self._entries.values(), self._plan, self._consumed, protect_plan)

    def _make_room(self, needed: int, protect_plan: bool) -> bool:
        """Evict so that ``needed`` more bytes fit; False (evicting nothing) if they cannot."""
        free = self.max_bytes - self._bytes_used()
        victims = victims_for_room(self._eviction_order(protect_plan), free, needed)
        if victims is None:
            return False
        for entry in victims:
            self._evict(entry)
        return True

    def _evict(self, entry: CacheEntry) -> None:
        path = self.cache_dir / entry.file_name
        # The tar first: an index alone is never mistaken for a complete shard.
        path.unlink(missing_ok=True)
        path.with_suffix(".idx").unlink(missing_ok=True)
        del self._entries[entry.file_name]
        self._counts["evictions"] += 1

    def _too_small_message(self, info: ShardInfo, needed: int) -> str:
        held = sum(entry.bytes for entry in self._entries.values() if entry.pins or not entry.ready)
        return (
            f"shard cache {self.cache_dir} ({self.max_bytes} bytes) has no room for {info.file} "
            f"({needed} bytes): shards in use or being staged take {held} bytes; "
            "raise --cache-size"
        )
