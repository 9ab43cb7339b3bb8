"""Which staged shards a full cache gives up: its entries and the eviction order, no I/O.

Pure functions of the cache's bookkeeping, so the policy can be read (and
tested) apart from the threads and files of :class:`~shards.cache.ShardCache`.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass


@dataclass
class CacheEntry:
    """A shard in the cache: being staged (bytes reserved) or ready on disk."""

    file_name: str  # cached_name(...)
    shard: str | None  # manifest name; None for a file of another dataset found in the dir
    bytes: int
    ready: bool
    pins: int = 0
    last_used: int = 0


def eviction_order(
    entries: Iterable[CacheEntry],
    plan: Mapping[str, int],
    consumed: Container[str],
    protect_plan: bool,
) -> list[CacheEntry]:
    """Entries that may be evicted, first to go first.

    Only ready, unheld entries qualify. Those the prefetch ``plan`` no longer
    awaits go first, least recently used first; shards staged ahead (in the
    plan, not yet ``consumed``) are kept if ``protect_plan``, else they follow,
    those needed last first.
    """

    def awaited(entry: CacheEntry) -> bool:
        return entry.shard in plan and entry.shard not in consumed

    idle = [entry for entry in entries if entry.ready and entry.pins == 0]
    unneeded = sorted((e for e in idle if not awaited(e)), key=lambda e: e.last_used)
    if protect_plan:
        return unneeded
    # On demand, shards staged ahead may go too, those needed last first.
    ahead = sorted((e for e in idle if awaited(e)), key=lambda e: -plan[e.shard])
    return unneeded + ahead


def victims_for_room(
    order: Iterable[CacheEntry], free: int, needed: int
) -> list[CacheEntry] | None:
    """The fewest entries from the front of ``order`` whose eviction frees ``needed`` bytes.

    None if evicting all of them would still leave less than ``needed`` free.
    """
    victims = []
    for entry in order:
        if free >= needed:
            break
        victims.append(entry)
        free += entry.bytes
    return victims if free >= needed else None
