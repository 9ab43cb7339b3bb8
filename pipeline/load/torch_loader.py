"""The pure PyTorch/PIL reference loader: the same samples, order and draws as DALI.

For machines without DALI, and as the oracle the DALI pipeline is tested
against. Decoding is PIL, augmentation is the numpy reference in
``pipeline.load.augment``; batches follow the same epoch plan and apply the same
per-sample draws, so the two backends differ only by their JPEG decoders.
``num_threads`` becomes the number of DataLoader worker processes (0: decode
in the calling process).

Remote shards: this backend could stream tars directly, but it reads the
same staged, verified cache files as DALI (``pipeline.load.staging``), so both
backends see the same bytes. The cache lives in the main process (it is
not picklable); the batch sampler, which runs there, holds a batch's shards
before a worker gets its indices, and the shards are released when the batch
comes back, so workers only read files that are staged and held.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.load.augment import AugmentSpec, train_reference, val_reference
from pipeline.load.base import EpochLoader, LoaderConfig
from pipeline.load.epochs import EpochPlan
from pipeline.load.samples import SampleReader
from pipeline.load.staging import LocalLeases, ShardLeases

# Batches each DataLoader worker has queued (torch's default, fixed here because the
# shard cache must hold the shards of every batch out at once).
PREFETCH_FACTOR = 2


def decode_rgb(jpeg: np.ndarray | bytes) -> np.ndarray:
    """JPEG bytes -> uint8 H×W×3 RGB with PIL."""
    with Image.open(io.BytesIO(bytes(jpeg))) as image:
        return np.asarray(image.convert("RGB"))


class ReferenceSamples(Dataset):
    """Map-style dataset whose "index" is a work item: (position, x, y, flip, alpha) or position.

    The batch sampler carries the epoch's draws, so worker processes need
    no random state of their own.
    """

    def __init__(self, reader: SampleReader, spec: AugmentSpec, ten_crop: bool):
        self.reader = reader
        self.spec = spec
        self.ten_crop = ten_crop

    def __len__(self) -> int:
        return self.reader.table.num_samples

    def __getitem__(self, work):
        if isinstance(work, tuple):
            position, offset_x, offset_y, flip, alpha = work
            jpeg, label, index = self.reader.read(position)
            image = train_reference(decode_rgb(jpeg), offset_x, offset_y, flip, alpha, self.spec)
        else:
            jpeg, label, index = self.reader.read(work)
            image = val_reference(decode_rgb(jpeg), self.spec, self.ten_crop)
        return torch.from_numpy(image), label, index


def batch_work(plan: EpochPlan, number: int, draws) -> list:
    """Batch ``number`` of ``plan`` as work items for ReferenceSamples.

    Built one batch at a time, as the sampler hands batches out: a whole
    ImageNet epoch of items would take seconds and hundreds of MB up front.
    """
    positions = plan.batch(number)
    if draws is None:
        return positions.tolist()
    return [
        (position, offset_x, offset_y, flip, np.asarray(alpha, np.float32))
        for position, offset_x, offset_y, flip, alpha in zip(
            positions.tolist(),
            draws.offset_x[positions].tolist(),
            draws.offset_y[positions].tolist(),
            draws.flip[positions].tolist(),
            draws.alpha[positions],
            strict=True,
        )
    ]


class LeasedBatches:
    """The batch sampler: hands out the planned batches, holding each one's shards first.

    The DataLoader iterates it in the main process as it gives batches to
    workers, so a batch's shards are staged before any worker reads them.
    """

    def __init__(self, plan: EpochPlan, first_batch: int, draws, leases: ShardLeases | LocalLeases):
        self.plan = plan
        self.first_batch = first_batch
        self.draws = draws
        self.leases = leases

    def __len__(self) -> int:
        """The batches still to come: ``first_batch..`` of the plan."""
        return max(0, self.plan.num_batches - self.first_batch)

    def __iter__(self):
        for number in range(self.first_batch, self.plan.num_batches):
            self.leases.before_batch(number)
            yield batch_work(self.plan, number, self.draws)


class TorchLoader(EpochLoader):
    """The loader on torch.utils.data.DataLoader + PIL."""

    def __init__(self, table, spec, config, draw, staged=None):
        super().__init__(table, spec, config, draw, staged)
        self._dataset = ReferenceSamples(self.reader(), spec, config.ten_crop)

    @staticmethod
    def batches_in_flight(config: LoaderConfig) -> int:
        return PREFETCH_FACTOR * config.num_threads

    def _run(self, plan: EpochPlan, first_batch: int, draws):
        if first_batch >= plan.num_batches:
            return
        leases = self.leases(plan, first_batch)
        try:
            # The inner generator ends (and with it the workers) before the shards go.
            yield from self._load(LeasedBatches(plan, first_batch, draws, leases))
        finally:
            leases.close()

    def _load(self, sampler: LeasedBatches):
        workers = min(self.config.num_threads, len(sampler))
        batches = DataLoader(
            self._dataset,
            batch_sampler=sampler,
            num_workers=workers,
            prefetch_factor=PREFETCH_FACTOR if workers else None,
            pin_memory=self.torch_device.type == "cuda",
        )
        for number, batch in enumerate(batches, start=sampler.first_batch):
            sampler.leases.after_batch(number)
            # From pinned memory, asynchronous: no wait for the GPU inside next(loader).
            yield tuple(part.to(self.torch_device, non_blocking=True) for part in batch)
