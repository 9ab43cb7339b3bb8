"""Remote shards for the loaders: staged into a local cache, held as the epoch plan needs them.

DALI and :class:`~pipeline.load.samples.SampleReader` read local files, so when
the shard location is ``http(s)://``, ``s3://`` or ``pipe:``
(:mod:`shards.remote`) the loader reads through a bounded, verified
:class:`~shards.cache.ShardCache`:

- At start the split's index files are fetched (a few at a time) and the
  :class:`~pipeline.load.samples.SplitTable` points at the names the verified
  tars will have in the cache; nothing else is downloaded yet.
- Each epoch, the cache is told the order in which this rank's plan first
  reads the shards and prefetches them in that order. Before a batch is
  read, every shard it needs is acquired (waiting until it is staged and its
  sha256 checked); a shard is released after the last batch that reads it
  (:class:`ShardLeases`). The DALI feeder reads a batch in one call; the
  torch backend acquires in the main process when the DataLoader hands a
  batch to a worker, and releases when the batch comes back, so workers only
  ever read files that are staged and held. Readers open a staged file per
  read, so an evicted shard never lingers on disk.
- Size: the shards held at one time come from a stretch of the epoch order
  that the shuffle window and the batches in flight bound, whatever the
  epoch; :func:`minimum_cache_bytes` is the most that stretch can weigh.
  A smaller ``cache_bytes`` is refused up front, naming the minimum; the
  default is :data:`DEFAULT_SIZE_FACTOR` times it (room to fetch ahead).
- One cache per directory per process: loaders of the same location (train
  and val in the trainer) share it, and its size. Without ``cache_dir`` it
  is a temporary directory of this process, removed at exit.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.load.epochs import EpochPlan, rank_batch_sizes, rank_batch_starts
from pipeline.load.samples import SplitTable, split_table_from_indexes
from shards.cache import ShardCache
from shards.cache_dir import cached_name, staged_bytes
from shards.errors import UserError
from shards.index import IndexDigest
from shards.manifest import Manifest, index_name
from shards.remote import ShardSource, read_index

DEFAULT_SIZE_FACTOR = 2
INDEX_FETCH_THREADS = 8


@dataclass(frozen=True)
class RemoteSplit:
    """A split of a remote location: its table (over cache paths) and what the cache counts."""

    table: SplitTable
    names: tuple[str, ...]  # shard file names, in manifest order
    shard_bytes: tuple[int, ...]  # tar + index, as the cache counts them
    indexes: tuple[IndexDigest, ...]  # of the index texts the table was built from


def read_remote_split(
    source: ShardSource, manifest: Manifest, split: str, cache_dir: Path
) -> RemoteSplit:
    """Fetch the index files of ``split`` and build its table over the cache's file names."""
    infos = manifest.split(split).shards
    if not infos:
        raise UserError(f"split {split!r} of {source.location} has no shards")
    with ThreadPoolExecutor(min(INDEX_FETCH_THREADS, len(infos))) as pool:
        texts = list(pool.map(lambda info: read_index(source, info.file), infos))
    tars = [Path(cache_dir) / cached_name(info) for info in infos]
    where = [source.describe(index_name(info.file)) for info in infos]
    table = split_table_from_indexes(tars, zip(where, texts, strict=True))
    for info, count, location in zip(infos, table.shard_sizes, where, strict=True):
        if count != info.num_samples:
            raise UserError(
                f"{location} lists {count} samples, the manifest {info.num_samples}; "
                "the index and the manifest are from different builds"
            )
    indexes = tuple(IndexDigest.of(text.encode("ascii")) for text in texts)
    return RemoteSplit(
        table=table,
        names=tuple(info.file for info in infos),
        shard_bytes=tuple(
            staged_bytes(info, index) for info, index in zip(infos, indexes, strict=True)
        ),
        indexes=indexes,
    )


# --- how much must fit ----------------------------------------------------------------------


def stretch_of_held_shards(
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle_window: int | None,
    batches_in_flight: int,
) -> int:
    """The longest stretch of the epoch's shard order (before the window shuffle) that the
    shards held at one time can come from; the same for every epoch.

    While batch ``b`` is read (or, with ``batches_in_flight`` F, returned
    while batches up to ``b + F`` are out), a held shard has a sample in this
    rank's batches up to ``b + F`` and one from ``b`` on, so its samples
    reach into the global positions of those batches; a sample lies in the
    shuffle window it started in, so the shard overlaps those windows of the
    concatenated shard order (``shuffle_window`` None: no shuffle).
    """
    sizes = rank_batch_sizes(num_samples, batch_size, world_size)
    steps = sizes.shape[1]
    starts = rank_batch_starts(sizes, rank)
    ends = starts + sizes[rank]
    last = np.minimum(np.arange(steps) + batches_in_flight, steps - 1)
    low, high = starts, ends[last]
    if shuffle_window is not None:
        low = low // shuffle_window * shuffle_window
        high = np.minimum(-(-high // shuffle_window) * shuffle_window, num_samples)
    return int((high - low).max())


def most_bytes_in_stretch(stretch: int, shard_samples, shard_bytes) -> int:
    """The most bytes of shards that ``stretch`` consecutive samples can touch, in any shard order.

    Two shards can be cut at the ends; the ones in between lie wholly inside,
    so there are at most two more than the smallest shards that fit in
    ``stretch - 2`` samples.
    """
    inside = fitted = 0
    for count in sorted(shard_samples):
        if inside + count > stretch - 2:
            break
        inside, fitted = inside + count, fitted + 1
    touched = min(len(shard_bytes), stretch, fitted + 2)
    return int(sum(sorted(shard_bytes, reverse=True)[:touched]))


def minimum_cache_bytes(
    remote: RemoteSplit,
    manifest: Manifest,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle_window: int | None,
    batches_in_flight: int,
) -> int:
    """The smallest cache a loader can run with: the shards it can hold at once (and at least
    two of the manifest's largest, which :class:`~shards.cache.ShardCache` asks for)."""
    stretch = stretch_of_held_shards(
        remote.table.num_samples, batch_size, rank, world_size, shuffle_window, batches_in_flight
    )
    held = most_bytes_in_stretch(stretch, remote.table.shard_sizes, remote.shard_bytes)
    largest = max(info.bytes for info in manifest.every_shard())
    return max(held, 2 * largest)


def describe_bytes(count: int) -> str:
    """``1288490188`` -> ``"1288490188 bytes (1.2 GiB)"``."""
    value, unit = float(count), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    return f"{count} bytes" if unit == "bytes" else f"{count} bytes ({value:.1f} {unit})"


# --- one cache per directory per process ----------------------------------------------------


@dataclass
class _Shared:
    cache: ShardCache
    location: str
    users: int
    temporary: bool


_LOCK = threading.Lock()
_SHARED: dict[Path, _Shared] = {}
_TEMPORARY: dict[str, Path] = {}  # location -> this process's default cache directory


def cache_directory(location: str, cache_dir: str | Path | None) -> Path:
    """``cache_dir``, or this process's temporary cache directory for ``location``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    with _LOCK:
        if location not in _TEMPORARY:
            _TEMPORARY[location] = Path(tempfile.mkdtemp(prefix="alexpipe-shard-cache-"))
        return _TEMPORARY[location]


def attach_cache(
    source: ShardSource, manifest: Manifest, directory: Path, cache_bytes: int | None, minimum: int
) -> ShardCache:
    """The cache in ``directory``, opened once per process; every attach needs a detach."""
    key = directory.resolve()
    with _LOCK:
        shared = _SHARED.get(key)
        if shared is None:
            size = DEFAULT_SIZE_FACTOR * minimum if cache_bytes is None else int(cache_bytes)
            _check_size(size, minimum, source.location)
            cache = ShardCache(source, manifest, directory, size)
            temporary = directory in _TEMPORARY.values()
            shared = _SHARED[key] = _Shared(cache, source.location, 0, temporary)
        else:
            if shared.location != source.location:
                raise UserError(
                    f"cache directory {directory} already holds shards of {shared.location} "
                    "in this process; give each location its own --cache-dir"
                )
            size = shared.cache.max_bytes
            if cache_bytes is not None and int(cache_bytes) != size:
                raise UserError(
                    f"cache directory {directory} is already open with {size} bytes "
                    "in this process; use the same size"
                )
            _check_size(size, minimum, source.location)
        shared.users += 1
        return shared.cache


def _check_size(size: int, minimum: int, location: str) -> None:
    if size < minimum:
        raise UserError(
            f"cache size {describe_bytes(size)} is too small for the shards of {location}: "
            "the shards a shuffle window and the batches in flight span can take "
            f"{describe_bytes(minimum)}; raise --cache-size to at least that"
        )


def detach_cache(cache: ShardCache) -> None:
    """Let go of an :func:`attach_cache`; the last one closes the cache."""
    with _LOCK:
        key = cache.cache_dir.resolve()
        shared = _SHARED.get(key)
        if shared is None or shared.cache is not cache:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del _SHARED[key]
        if shared.temporary:
            for location, directory in list(_TEMPORARY.items()):
                if directory.resolve() == key:
                    del _TEMPORARY[location]
    cache.close()
    if shared.temporary:
        shutil.rmtree(cache.cache_dir, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    """Stop prefetching and remove temporary cache directories when the process ends."""
    with _LOCK:
        shared = list(_SHARED.values())
        temporary = list(_TEMPORARY.values())
        _SHARED.clear()
        _TEMPORARY.clear()
    for entry in shared:
        entry.cache.close()
    for directory in temporary:
        shutil.rmtree(directory, ignore_errors=True)


# --- per loader, per epoch ------------------------------------------------------------------


class StagedShards:
    """A loader's view of the cache: acquire and release shards by their number in the split."""

    def __init__(self, remote: RemoteSplit, cache: ShardCache):
        self.remote = remote
        self.cache = cache
        self._closed = False
        self._checked: set[int] = set()  # shards whose staged index is known to be the table's
        for number, name in enumerate(remote.names):
            if cache.path_of(name) != remote.table.paths[number]:
                raise AssertionError(f"{name}: the table and the cache disagree on its path")
        # The cache stages these shards against the index texts the table was built from.
        cache.know_indexes(dict(zip(remote.names, remote.indexes, strict=True)))

    def acquire(self, shard: int) -> Path:
        """Wait until shard number ``shard`` is staged and verified, and hold it."""
        name = self.remote.names[shard]
        path = self.cache.acquire(name)
        if shard not in self._checked:
            try:
                self._check_index(shard, path)
            except BaseException:
                self.cache.release(name)
                raise
            self._checked.add(shard)
        return path

    def _check_index(self, shard: int, path: Path) -> None:
        """The staged index must be the one the table was built from.

        The cache stages a shard (again, after an eviction) only with the
        index the tar yields and that matches the digest it was first given
        for it; so once that digest is this loader's and the copy there now
        matches it (one a previous run left was never checked), every later
        copy does too: checked once per shard.
        """
        index = self.remote.indexes[shard]
        staged = IndexDigest.of(path.with_suffix(".idx").read_bytes())
        if self.cache.known_index(self.remote.names[shard]) != index or staged != index:
            raise UserError(
                f"{self.remote.names[shard]}: the index this loader started with does not "
                "describe the verified tar (the shards changed at their location); start again"
            )

    def release(self, shard: int) -> None:
        self.cache.release(self.remote.names[shard])

    def leases(self, plan: EpochPlan, first_batch: int) -> ShardLeases:
        """Start holding shards for batches ``first_batch..`` of ``plan`` (prefetch begins)."""
        return ShardLeases(self, plan, first_batch)

    def close(self) -> None:
        """Let go of the cache (closed when no loader uses it any more)."""
        if not self._closed:
            self._closed = True
            detach_cache(self.cache)


class ShardLeases:
    """The shards of one epoch of one rank: acquired before the first batch that reads them,
    released after the last. Call :meth:`before_batch` and :meth:`after_batch` in batch order."""

    def __init__(self, staged: StagedShards, plan: EpochPlan, first_batch: int):
        self.staged = staged
        self._held: set[int] = set()
        start = int(plan.bounds[first_batch])
        counts = np.diff(plan.bounds)[first_batch:]
        batches = np.repeat(np.arange(first_batch, plan.num_batches), counts)
        shards = staged.remote.table.shard[plan.positions[start:]]
        used, first_index = np.unique(shards, return_index=True)
        _, last_from_end = np.unique(shards[::-1], return_index=True)
        last_index = len(shards) - 1 - last_from_end
        self._acquire_at: dict[int, list[int]] = {}
        self._release_at: dict[int, list[int]] = {}
        order = np.argsort(first_index, kind="stable")
        for shard, first, last in zip(
            used[order], first_index[order], last_index[order], strict=True
        ):
            self._acquire_at.setdefault(int(batches[first]), []).append(int(shard))
            self._release_at.setdefault(int(batches[last]), []).append(int(shard))
        names = staged.remote.names
        staged.cache.prefetch([names[int(shard)] for shard in used[order]])

    def before_batch(self, number: int) -> None:
        """Hold every shard batch ``number`` reads (blocks until staged and verified)."""
        for shard in self._acquire_at.pop(number, ()):
            self.staged.acquire(shard)
            self._held.add(shard)

    def after_batch(self, number: int) -> None:
        """Batch ``number`` has been read: let go of the shards no later batch reads."""
        for shard in self._release_at.pop(number, ()):
            if shard in self._held:
                self._held.discard(shard)
                self.staged.release(shard)

    def close(self) -> None:
        """Let go of everything still held (the end of the epoch, or its abandonment)."""
        while self._held:
            self.staged.release(self._held.pop())


class LocalLeases:
    """Shards on local disk need no holding."""

    def before_batch(self, number: int) -> None:
        pass

    def after_batch(self, number: int) -> None:
        pass

    def close(self) -> None:
        pass
