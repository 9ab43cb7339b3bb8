"""The pure PyTorch/PIL reference loader: the same samples, order and draws as DALI.

For machines without DALI, and as the oracle the DALI pipeline is tested
against. Decoding is PIL, augmentation is the numpy reference in
``pipeline.load.augment``; batches follow the same epoch plan and apply the same
per-sample draws, so the two backends differ only by their JPEG decoders.
``num_threads`` becomes the number of DataLoader worker processes (0: decode
in the calling process).

A sample PIL cannot decode does not fail its batch in the worker: it comes
back in its place as a :class:`BadSample`, the batch is collated without it
(:func:`collate_decoded`), and the loader's policy decides, in the main
process, whether the run stops or goes on without it.

Remote shards: the workers' sample readers stage each shard on its first read
into the same verified cache DALI reads (``pipeline.load.staging``); the cache
lives in its directory, so the workers and the main process share it.
"""

from __future__ import annotations

import gc
import io
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.load.augment import AugmentSpec, train_reference, val_reference
from pipeline.load.bad_samples import BadSample
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


def decode_failure(error: Exception) -> str:
    """PIL's words for a JPEG it cannot decode, without the repr of our in-memory file."""
    return f"PIL: {re.sub(r' <[^>]*>', '', str(error)) or type(error).__name__}"


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
        position = work[0] if isinstance(work, tuple) else work
        jpeg, label, index = self.reader.read(position)
        try:
            pixels = decode_rgb(jpeg)
        except Exception as error:  # PIL raises many types for bad data
            return self.reader.describe(position, decode_failure(error))
        if isinstance(work, tuple):
            _, offset_x, offset_y, flip, alpha = work
            image = train_reference(pixels, offset_x, offset_y, flip, alpha, self.spec)
        else:
            image = val_reference(pixels, self.spec, self.ten_crop)
        return torch.from_numpy(image), label, index


def collate_decoded(samples: list) -> tuple:
    """``(images, labels, indices, bad samples)`` of a batch: the samples that decoded,
    collated as torch does, and the :class:`BadSample` of each one that did not."""
    bad = [sample for sample in samples if isinstance(sample, BadSample)]
    if not bad:
        return (*default_collate(samples), bad)
    decoded = [sample for sample in samples if not isinstance(sample, BadSample)]
    return (*default_collate(decoded), bad) if decoded else (None, None, None, bad)


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

    def __init__(self, table, spec, config, draw, cache=None, **options):
        super().__init__(table, spec, config, draw, cache, **options)
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
            collate_fn=collate_decoded,
        )
        try:
            for number, (*batch, bad) in enumerate(batches, start=first_batch):
                if bad:
                    self.bad_batch(number, bad, left=0 if batch[0] is None else len(batch[1]))
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
