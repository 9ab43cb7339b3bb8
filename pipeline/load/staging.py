"""Remote shards for the loaders: the split's table over a shard cache big enough for the run.

For a location that is not a local directory, the loader reads the split's index
files (a few at a time), builds its :class:`~pipeline.load.samples.SplitTable`
over the names the verified tars have in a :class:`~shards.cache.ShardCache`, and
its sample reader reads through that cache, which stages each shard on its first
read; each epoch, the cache prefetches in the order that epoch reads the shards.

Size: the shards in use at one time come from a stretch of the epoch order that the
shuffle window and the batches in flight bound, whatever the epoch;
:func:`minimum_cache_bytes` is the most that stretch can weigh. A smaller
``cache_bytes`` is refused up front, naming the minimum; the default is
:data:`DEFAULT_SIZE_FACTOR` times it (the rest is room to fetch ahead).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.load.epochs import EpochPlan, rank_batch_sizes, rank_batch_starts
from pipeline.load.samples import SplitTable, split_table_from_indexes
from shards.cache import ShardCache
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
    """The table of a remote split and the cache its reader reads through, sized for
    ``stretch`` samples in use at once (:func:`stretch_in_use`)."""
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
    if size < minimum:
        raise UserError(
            f"cache size {describe_bytes(size)} is too small for the shards of "
            f"{source.location}: the shards a shuffle window and the batches in flight span "
            f"can take {describe_bytes(minimum)}; raise --cache-size to at least that"
        )
    indexes = [IndexDigest.of(text.encode("ascii")) for text in texts]
    cache = ShardCache(source, infos, cache_dir, size, indexes, working_bytes=minimum)
    paths = tuple(cache.path(number) for number in range(len(infos)))
    return dataclasses.replace(table, paths=paths), cache


def stretch_in_use(
    num_samples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle_window: int | None,
    batches_in_flight: int,
) -> int:
    """The longest stretch of the epoch's shard order (before the window shuffle) whose
    shards are in use at one time; the same for every epoch.

    While batch ``b`` is read (and, with ``batches_in_flight`` F, batches up to
    ``b + F``), the shards in use have a sample in this rank's batches ``b..b + F``
    or later in the shuffle windows those batches reach into (``shuffle_window``
    None: no shuffle), so they overlap that stretch of the concatenated shard order.
    """
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
    """The most bytes of shards that ``stretch`` consecutive samples can touch, in any shard
    order, and at least two of the largest (which :class:`~shards.cache.ShardCache` asks for).

    Two shards can be cut at the ends; the ones in between lie wholly inside, so there are
    at most two more than the smallest shards that fit in ``stretch - 2`` samples.
    """
    inside = fitted = 0
    for count in sorted(info.num_samples for info in infos):
        if inside + count > stretch - 2:
            break
        inside, fitted = inside + count, fitted + 1
    largest_first = sorted((info.bytes for info in infos), reverse=True)
    touched = min(len(infos), stretch, fitted + 2)
    return max(sum(largest_first[:touched]), 2 * largest_first[0])


def first_reads(table: SplitTable, plan: EpochPlan, first_batch: int) -> list[int]:
    """Shard numbers in the order batches ``first_batch..`` of ``plan`` first read them."""
    shards = table.shard[plan.positions[int(plan.bounds[first_batch]) :]]
    numbers, first = np.unique(shards, return_index=True)
    return numbers[np.argsort(first)].tolist()


def describe_bytes(count: int) -> str:
    """``1288490188`` -> ``"1288490188 bytes (1.2 GiB)"``."""
    value, unit = float(count), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    return f"{count} bytes" if unit == "bytes" else f"{count} bytes ({value:.1f} {unit})"
