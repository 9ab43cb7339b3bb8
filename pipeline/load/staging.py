"""Remote shards for the loaders: the split's table over a shard cache big enough for the run.

The loader reads the split's index files and its table points at the names the verified
tars have in a :class:`~shards.cache.ShardCache`, which stages each shard on its first
read. Its size must cover the shards in use at once, which come from a stretch of the
epoch order that the shuffle window and the batches in flight bound; the default is twice it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.load.epochs import EpochPlan, rank_batch_sizes, rank_batch_starts
from pipeline.load.samples import SplitTable, split_table_from_indexes
from shards.cache import ShardCache, least_working_bytes
from shards.errors import UserError
from shards.index import IndexDigest
from shards.manifest import Manifest, index_name
from shards.remote import ShardSource, read_index
from shards.writer import ShardInfo

DEFAULT_SIZE_FACTOR = 2
INDEX_FETCH_THREADS = 8


def open_remote_split(
    source: ShardSource,
    manifest: Manifest,
    split: str,
    cache_dir: str | Path | None,
    cache_bytes: int | None,
    stretch: int,
) -> tuple[SplitTable, ShardCache]:
    """The table of a remote split and the cache it reads through, sized for ``stretch``
    samples in use at once (:func:`stretch_in_use`)."""
    infos = manifest.split(split).shards
    if not infos:
        raise UserError(f"split {split!r} of {source.location} has no shards")
    with ThreadPoolExecutor(min(INDEX_FETCH_THREADS, len(infos))) as pool:
        texts = list(pool.map(lambda info: read_index(source, info.file), infos))
    where = [source.describe(index_name(info.file)) for info in infos]
    table = split_table_from_indexes(
        [Path(info.file) for info in infos], zip(where, texts, strict=True)
    )
    for info, count, location in zip(infos, table.shard_sizes, where, strict=True):
        if count != info.num_samples:
            raise UserError(
                f"{location} lists {count} samples, the manifest {info.num_samples}; "
                "the index and the manifest are from different builds"
            )
    minimum = minimum_cache_bytes(stretch, infos)
    size = DEFAULT_SIZE_FACTOR * minimum if cache_bytes is None else int(cache_bytes)
    indexes = [IndexDigest.of(text) for text in texts]
    cache = ShardCache(source, infos, indexes, cache_dir, size, working_bytes=minimum)
    return dataclasses.replace(table, paths=cache.paths), cache


def stretch_in_use(
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle_window: int | None,
    batches_in_flight: int,
) -> int:
    """The longest stretch of the epoch's shard order (before the window shuffle) whose shards
    are in use at once, whatever the epoch: while this rank reads batches ``b..b + F``
    (F: ``batches_in_flight``), its shards in use have samples there or later in the shuffle
    windows those batches reach into (``shuffle_window`` None: no shuffle)."""
    sizes = rank_batch_sizes(num_samples, batch_size, world_size)
    steps = sizes.shape[1]
    starts = rank_batch_starts(sizes, rank)
    ends = starts + sizes[rank]
    low, high = starts, ends[np.minimum(np.arange(steps) + batches_in_flight, steps - 1)]
    if shuffle_window is not None:
        low = low // shuffle_window * shuffle_window
        high = np.minimum(-(-high // shuffle_window) * shuffle_window, num_samples)
    return int((high - low).max())


def minimum_cache_bytes(stretch: int, infos: tuple[ShardInfo, ...]) -> int:
    """The most bytes of shards that ``stretch`` consecutive samples can touch in any shard
    order (two cut at the ends, and at most as many between as the smallest shards that fit
    in ``stretch - 2`` samples), and at least two of the largest (what a cache asks for)."""
    inside = fitted = 0
    for count in sorted(info.num_samples for info in infos):
        if inside + count > stretch - 2:
            break
        inside, fitted = inside + count, fitted + 1
    largest_first = sorted((info.bytes for info in infos), reverse=True)
    touched = min(len(infos), stretch, fitted + 2)
    return max(sum(largest_first[:touched]), least_working_bytes(infos))


def first_reads(table: SplitTable, plan: EpochPlan, first_batch: int) -> list[int]:
    """Shard numbers in the order batches ``first_batch..`` of ``plan`` first read them."""
    shards = table.shard[plan.positions[int(plan.bounds[first_batch]) :]]
    numbers, first = np.unique(shards, return_index=True)
    return numbers[np.argsort(first)].tolist()
