"""Which samples a rank reads in which batch of an epoch: a pure function of the seed.

Samples are named by their *position* in the split: shard by shard in
manifest order, then in tar order inside a shard (0..N-1).

Order (train): the shard order is permuted, then the concatenated samples
are shuffled inside consecutive windows of ``shuffle_window`` samples, both
from ``(seed, epoch)``. This is what a WebDataset shard shuffle plus a
shuffle buffer does, without the buffer's warm-up bias, and it keeps reads
local (a window spans a few shards). Val keeps the manifest order.

Split over ranks (the uneven-split policy): every rank runs the same number
of batches, ``num_batches(N, batch_size, world_size)``, so DDP never waits on
a rank that has run out; the N samples are divided among ranks as evenly as
possible (sizes differ by at most one) and each sample is read exactly once
per epoch — nothing is dropped, padded or repeated. The price is that a
rank's last one or two batches can be smaller than ``batch_size``. A global
step ``t`` is made of batch ``t`` of every rank, taken in rank order from
consecutive positions of the epoch order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shards.errors import UserError

DEFAULT_SHUFFLE_WINDOW = 8192
ORDER_STREAM = 0


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches for one epoch: ``positions[bounds[b]:bounds[b+1]]`` is batch ``b``."""

    epoch: int
    positions: np.ndarray  # int64 split positions, in delivery order
    bounds: np.ndarray  # int64, num_batches + 1 entries

    @property
    def num_batches(self) -> int:
        return len(self.bounds) - 1

    def batch(self, number: int) -> np.ndarray:
        """Split positions of batch ``number`` of this rank."""
        return self.positions[self.bounds[number] : self.bounds[number + 1]]


def rank_batch_sizes(num_samples: int, batch_size: int, world_size: int) -> np.ndarray:
    """Batch sizes, [world_size, num_batches]: equal step counts, every sample once.

    Rank ``r`` gets ``N // W`` samples, plus one if ``r < N % W``, in full
    batches followed by one partial batch. A rank holding exactly one fewer
    full batch's worth than the step count needs splits its last full batch
    in two (``batch_size - 1`` and 1) so that it keeps step with the others.
    """
    if batch_size < 1 or world_size < 1:
        raise UserError("batch size and world size must be at least 1")
    if num_samples < world_size:
        raise UserError(
            f"{num_samples} samples cannot be shared by {world_size} ranks "
            "(every rank needs at least one)"
        )
    per_rank = [
        num_samples // world_size + (rank < num_samples % world_size) for rank in range(world_size)
    ]
    steps = -(-max(per_rank) // batch_size)
    sizes = np.full((world_size, steps), batch_size, dtype=np.int64)
    for rank, count in enumerate(per_rank):
        last = count - batch_size * (steps - 1)
        if last >= 1:
            sizes[rank, -1] = last
        elif batch_size >= 2:
            # count == batch_size * (steps - 1): one step short; split the last full batch.
            sizes[rank, -2:] = (batch_size - 1, 1)
        else:
            raise UserError(
                f"batch size 1 cannot give {world_size} ranks equal step counts over "
                f"{num_samples} samples; use a batch size of at least 2"
            )
    return sizes


def rank_batch_starts(sizes: np.ndarray, rank: int) -> np.ndarray:
    """Where each batch of ``rank`` starts in the epoch order, for ``sizes`` from
    :func:`rank_batch_sizes`: step by step, rank by rank inside a step."""
    step_major = sizes.T.ravel()
    starts = np.concatenate([[0], np.cumsum(step_major)[:-1]]).reshape(sizes.shape[1], -1)
    return starts[:, rank]


def num_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per epoch (the same on every rank): ``len(loader)``."""
    return int(rank_batch_sizes(num_samples, batch_size, world_size).shape[1])


def epoch_order(
    shard_sizes: Sequence[int],
    seed: int,
    epoch: int,
    shuffle: bool = True,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
) -> np.ndarray:
    """All split positions in this epoch's reading order (before the split over ranks)."""
    shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]])
    if not shuffle:
        return np.arange(int(shard_sizes.sum()), dtype=np.int64)
    generator = np.random.default_rng(np.random.SeedSequence([seed, epoch, ORDER_STREAM]))
    shard_order = generator.permutation(len(shard_sizes))
    order = np.concatenate(
        [np.arange(starts[shard], starts[shard] + shard_sizes[shard]) for shard in shard_order]
    ).astype(np.int64)
    for start in range(0, len(order), shuffle_window):
        window = order[start : start + shuffle_window]
        window[:] = generator.permutation(window)
    return order


def plan_epoch(
    shard_sizes: Sequence[int],
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
) -> EpochPlan:
    """Rank ``rank``'s batches of ``epoch`` (see the module docstring for the policy)."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1}")
    order = epoch_order(shard_sizes, seed, epoch, shuffle, shuffle_window)
    sizes = rank_batch_sizes(len(order), batch_size, world_size)
    rank_starts = rank_batch_starts(sizes, rank)
    rank_sizes = sizes[rank]
    positions = np.concatenate(
        [order[start : start + size] for start, size in zip(rank_starts, rank_sizes, strict=True)]
    )
    bounds = np.concatenate([[0], np.cumsum(rank_sizes)]).astype(np.int64)
    return EpochPlan(epoch=epoch, positions=positions, bounds=bounds)
