"""Which sample goes into which shard: decided before any work starts.

The plan is a pure function of the sorted source listing, the shard size and
the seed, so the output cannot depend on the number of workers, their
timing, or which shards a crashed run had already finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlannedSample:
    """One input and its position in the split (``index`` in KEY.json)."""

    index: int
    item: object  # pipeline.build.sources.SourceItem


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its name and its samples in write order."""

    split: str
    shard_index: int
    samples: tuple[PlannedSample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.shard_index:06d}"


def plan_split(split: str, items: Sequence, shard_size: int, seed: int) -> list[ShardPlan]:
    """Cut one split's sorted items into shards.

    Train samples go through a seeded permutation first, so that no shard
    holds a single class and a loader shuffling shards mixes classes; val
    keeps the sorted name order (evaluation wants no randomness).
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    order = np.arange(len(items))
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(items))
    samples = [PlannedSample(int(position), items[int(position)]) for position in order]
    return [
        ShardPlan(split, shard_index, tuple(samples[start : start + shard_size]))
        for shard_index, start in enumerate(range(0, len(samples), shard_size))
    ]


def ordered_splits(names) -> list[str]:
    """Split names in the one order used everywhere: train first, then by name."""
    return sorted(names, key=lambda name: (name != "train", name))


def plan_build(items_by_split: dict[str, Sequence], shard_size: int, seed: int) -> list[ShardPlan]:
    """All shards of all splits, train first, in a fixed order."""
    plans: list[ShardPlan] = []
    for split in ordered_splits(items_by_split):
        plans.extend(plan_split(split, items_by_split[split], shard_size, seed))
    return plans
