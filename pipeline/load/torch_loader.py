"""The pure PyTorch/PIL reference loader: the same samples, order and draws as DALI.

For machines without DALI, and as the oracle the DALI pipeline is tested
against. Decoding is PIL, augmentation is the numpy reference in
``pipeline.load.augment``; batches follow the same epoch plan and apply the same
per-sample draws, so the two backends differ only by their JPEG decoders.
``num_threads`` becomes the number of DataLoader worker processes (0: decode
in the calling process).

Remote shards: the workers' sample readers stage each shard on its first read
into the same verified cache DALI reads (``pipeline.load.staging``); the cache
lives in its directory, so the workers and the main process share it.
"""

from __future__ import annotations

import gc
import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.load.augment import AugmentSpec, train_reference, val_reference
from pipeline.load.base import EpochLoader, LoaderConfig
from pipeline.load.epochs import EpochPlan
from pipeline.load.samples import SampleReader
from shards.errors import UserError

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


class TorchLoader(EpochLoader):
    """The loader on torch.utils.data.DataLoader + PIL."""

    def __init__(self, table, spec, config, draw, cache=None):
        super().__init__(table, spec, config, draw, cache)
        self._dataset = ReferenceSamples(self.reader(), spec, config.ten_crop)

    @staticmethod
    def batches_in_flight(config: LoaderConfig) -> int:
        return PREFETCH_FACTOR * config.num_threads

    def _run(self, plan: EpochPlan, first_batch: int, draws):
        numbers = range(first_batch, plan.num_batches)
        if not numbers:
            return
        workers = min(self.config.num_threads, len(numbers))
        if workers:
            # A DALI pipeline left in a reference cycle is collected here, not in a forked
            # worker, where its shutdown would wait forever for threads only this process has.
            gc.collect()
        batches = DataLoader(
            self._dataset,
            batch_sampler=(batch_work(plan, number, draws) for number in numbers),
            num_workers=workers,
            prefetch_factor=PREFETCH_FACTOR if workers else None,
            pin_memory=self.torch_device.type == "cuda",
        )
        try:
            for batch in batches:
                # From pinned memory, asynchronous: no wait for the GPU inside next(loader).
                yield tuple(part.to(self.torch_device, non_blocking=True) for part in batch)
        except UserError as error:
            # Without its traceback, which holds the DataLoader's iterator: the workers end now.
            raise worker_error(error.with_traceback(None)) from None


def worker_error(error: UserError) -> UserError:
    """A worker's UserError (a corrupt remote shard, say) as its one line: DataLoader re-raises
    it with the worker's traceback in the message."""
    lines = str(error).strip().splitlines()
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return error
    return type(error)(lines[-1].split(": ", 1)[-1])
