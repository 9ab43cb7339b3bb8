"""What both loader backends share: run settings, epoch state, and access to the shards.

Both backends read the same samples in the same order (:mod:`pipeline.load.epochs`)
with the same random draws (:mod:`pipeline.load.augment`), through
:class:`~pipeline.load.samples.SampleReader`. A backend subclasses
:class:`EpochLoader` and implements ``_run``; it imports this module, never the
factory (:mod:`pipeline.load.loader`), which imports a backend only when it is chosen.

Epochs: each ``iter(loader)`` is the next epoch (the first is 0). A loader
remembers how many batches of the current epoch were handed out;
``state_dict()`` / ``load_state_dict()`` carry ``{"epoch",
"batches_consumed"}`` so a resumed run continues mid-epoch with the exact
remaining batches. ``set_epoch(n)`` makes the next iteration epoch ``n``.

Bad samples: a sample that does not decode goes to the loader's
:class:`~pipeline.load.bad_samples.BadSamples` (:meth:`EpochLoader.bad_batch`),
which stops the run with one line or skips the sample (``take_skipped`` says
which were skipped).

Remote shards: ``cache`` (:class:`~shards.cache.ShardCache`) is where the
reader's files are staged, on its first read of each; each epoch asks it to
prefetch in the order the epoch reads them. None for local shards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.load.augment import AugmentDraws, AugmentSpec
from pipeline.load.augment import draw_augmentation as paper_draws
from pipeline.load.bad_samples import AllSamplesBadError, BadSample, BadSamples, no_sample_left
from pipeline.load.epochs import DEFAULT_SHUFFLE_WINDOW, EpochPlan, num_batches, plan_epoch
from pipeline.load.interface import Device
from pipeline.load.samples import SampleReader, SplitTable
from pipeline.load.staging import first_reads
from shards.cache import ShardCache
from shards.errors import UserError

DrawFunction = Callable[[int, int, int, AugmentSpec], AugmentDraws]


@dataclass(frozen=True)
class LoaderConfig:
    """Run settings of a loader, resolved and validated by ``create_loader``."""

    split: str = "train"
    batch_size: int = 128
    device: Device = Device.CPU
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_threads: int = 2
    ten_crop: bool = False
    with_index: bool = False
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW

    @property
    def is_train(self) -> bool:
        return self.split == "train"


def torch_device(device: Device):
    """The torch device batches are delivered on: the current CUDA device for ``cuda``."""
    import torch  # the backends need it anyway; importing this module does not

    if device is Device.CUDA:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class EpochLoader:
    """Epoch bookkeeping; a backend implements ``_run(plan, first_batch, draws)``.

    ``_run`` yields ``(images, labels, indices)`` torch tensors for the
    batches ``first_batch..`` of ``plan``, reading through :meth:`reader`. Satisfies
    :class:`~pipeline.load.interface.ResumableLoader`.
    """

    def __init__(
        self,
        table: SplitTable,
        spec: AugmentSpec,
        config: LoaderConfig,
        draw: DrawFunction = paper_draws,
        cache: ShardCache | None = None,
        *,
        bad_samples: BadSamples,
    ):
        self.table = table
        self.spec = spec
        self.config = config
        self.cache = cache
        self._draw = draw
        self.bad_samples = bad_samples
        self._length = num_batches(table.num_samples, config.batch_size, config.world_size)
        self._epoch = 0
        self._consumed = 0
        self._pending = True  # the next iteration resumes (_epoch, _consumed) as is
        self._running: weakref.ref | None = None
        self._readers: list[SampleReader] = []
        self.torch_device = torch_device(config.device)

    def __len__(self) -> int:
        """Batches of this rank in a full epoch (equal on every rank)."""
        return self._length

    @property
    def epoch(self) -> int:
        """The epoch being iterated, or the one the next iteration starts."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (no-op for the epoch a loaded state resumes)."""
        if self._pending and epoch == self._epoch:
            return
        self._epoch, self._consumed, self._pending = int(epoch), 0, True

    def state_dict(self) -> dict:
        """Where to resume: the epoch and how many of its batches were handed out."""
        epoch, consumed = self._epoch, self._consumed
        if not self._pending and consumed >= self._length:
            epoch, consumed = epoch + 1, 0
        config = self.config
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "seed": config.seed,
            "world_size": config.world_size,
            "batch_size": config.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (from :meth:`state_dict`); the next iteration continues there."""
        consumed = int(state.get("batches_consumed", 0))
        config = self.config
        if consumed and any(
            key in state and state[key] != getattr(config, key)
            for key in ("seed", "world_size", "batch_size")
        ):
            raise UserError(
                "cannot resume mid-epoch with another seed, world size or batch size "
                f"(saved {state}); the epoch's sample split would differ"
            )
        if not 0 <= consumed <= self._length:
            raise UserError(f"loader state has {consumed} batches of an epoch of {self._length}")
        self._epoch, self._consumed, self._pending = int(state["epoch"]), consumed, True

    @staticmethod
    def batches_in_flight(config: LoaderConfig) -> int:
        """Batches a backend may have out (being read) ahead of the one it returns."""
        return 0

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's batches of ``epoch``."""
        config = self.config
        return plan_epoch(
            self.table.shard_sizes,
            config.batch_size,
            config.rank,
            config.world_size,
            config.seed,
            epoch,
            shuffle=config.is_train,
            shuffle_window=config.shuffle_window,
        )

    def reader(self) -> SampleReader:
        """A sample reader for this loader's shards, closed with the loader."""
        reader = SampleReader(self.table, with_index=self.config.with_index, cache=self.cache)
        self._readers.append(reader)
        return reader

    def take_skipped(self) -> list[BadSample]:
        """The samples skipped (``on_bad_sample="skip"``) since the last call, in the order
        their batches were handed out; each was left out of the batch it belonged to."""
        return self.bad_samples.take_skipped()

    def bad_batch(self, batch_number: int, bad: list[BadSample], left: int) -> None:
        """Hand the ``bad`` samples of batch ``batch_number`` to the policy: it raises to
        stop; it returns when the batch goes on without them (``left`` samples remain)."""
        for sample in bad:
            self.bad_samples(sample, self.table.paths[int(self.table.shard[sample.position])])
        if not left:
            message = no_sample_left(batch_number, self.config.rank, bad, self.bad_samples.location)
            raise AllSamplesBadError(message)

    def close(self) -> None:
        """Stop the epoch in progress, close the shard files and let go of the shard
        cache (remote shards). Closing again does nothing."""
        self._close_running()
        for reader in self._readers:
            reader.close()
        if self.cache is not None:
            self.cache.close()

    def __iter__(self):
        self._close_running()  # an abandoned epoch: stop its prefetching first
        if not self._pending:
            self._epoch, self._consumed = self._epoch + 1, 0
        self._pending = False
        iteration = self._iterate(self._epoch, self._consumed)
        # Weak: a dropped iteration is closed (and its prefetching stopped) right away,
        # while the loader is still whole, instead of with the loader in a reference cycle.
        self._running = weakref.ref(iteration)
        return iteration

    def _close_running(self) -> None:
        """Close the iteration in progress, if there is one."""
        running = self._running() if self._running is not None else None
        if running is not None:
            running.close()

    def _iterate(self, epoch: int, first_batch: int):
        plan = self.plan(epoch)
        if self.cache is not None and first_batch < plan.num_batches:
            self.cache.prefetch(first_reads(self.table, plan, first_batch))
        draws = None
        if self.config.is_train:
            draws = self._draw(self.config.seed, epoch, self.table.num_samples, self.spec)
        batches = self._run(plan, first_batch, draws)
        try:
            for images, labels, indices in batches:
                self._consumed += 1
                yield (images, labels, indices) if self.config.with_index else (images, labels)
        finally:
            batches.close()

    def _run(self, plan: EpochPlan, first_batch: int, draws: AugmentDraws | None):
        raise NotImplementedError
