"""DALI pipelines for training and validation, and the loader that drives them.

Samples enter through ``fn.external_source``, fed batch by batch from our own
epoch plan (``pipeline.load.epochs``) with the bytes read by offset through the
DALI index files. DALI's webdataset reader would shard by padding or
duplicating samples and its shuffle is not reproducible per epoch; feeding
the plan gives the exact SPEC semantics (every sample once per epoch over
all ranks, seeded order per epoch) while decoding and augmentation stay DALI
operators on the chosen device:

- train: ``decoders.image_crop`` decodes only the random 224 window (ROI
  decoding: about a third faster on CPU, where libjpeg-turbo gives exactly
  the pixels of a full decode and crop), then one ``crop_mirror_normalize``
  applies the flip, the lighting offset (folded into its per-sample mean)
  and the channel normalization; the paper's mean image is subtracted after;
- val: the central window, or the ten patches stacked as 10×3×224×224.

The random values come from ``pipeline.load.augment.draw_augmentation`` and
reach the operators as per-sample arguments, which is what lets the tests
pin them and compare with the PyTorch reference.

Remote shards: the feeder holds the shards of the batch it reads
(``pipeline.load.staging``); the bytes are in memory once it returns, so a shard
is let go right after the last batch that reads it.
"""

from __future__ import annotations

import sys

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

from pipeline.load.augment import AugmentSpec, channel_shift, mean_image_chw, ten_crop_geometry
from pipeline.load.epochs import EpochPlan
from pipeline.load.loader import EpochLoader
from pipeline.load.samples import SampleReader
from pipeline.load.staging import LocalLeases, ShardLeases

PREFETCH_QUEUE_DEPTH = 2


class BatchFeeder:
    """The external source callback: one planned batch per call, StopIteration at the end."""

    def __init__(self, reader: SampleReader, spec: AugmentSpec, train: bool):
        self.reader = reader
        self.spec = spec
        self.train = train
        self._batches = iter(())
        self._draws = None
        self._leases: ShardLeases | LocalLeases = LocalLeases()

    def start(
        self,
        plan: EpochPlan,
        first_batch: int,
        draws,
        leases: ShardLeases | LocalLeases | None = None,
    ) -> None:
        """Feed batches ``first_batch..`` of ``plan`` (with ``draws`` for train) from now on,
        holding their shards through ``leases``."""
        self._batches = (
            (number, plan.batch(number)) for number in range(first_batch, plan.num_batches)
        )
        self._draws = draws
        self._leases = leases or LocalLeases()

    def stop(self) -> None:
        """End the epoch early: every further call raises StopIteration."""
        self._batches = iter(())

    def __call__(self):
        number, positions = next(self._batches)  # StopIteration: the epoch is over
        self._leases.before_batch(number)
        samples = [self.reader.read(int(position)) for position in positions]
        self._leases.after_batch(number)
        jpegs = [jpg for jpg, _, _ in samples]
        labels = np.array([label for _, label, _ in samples], dtype=np.int64)
        indices = np.array([index for _, _, index in samples], dtype=np.int64)
        if not self.train:
            return jpegs, labels, indices
        draws, scale = self._draws, np.float32(self.spec.max_offset)
        crop_x = draws.offset_x[positions].astype(np.float32) / scale
        crop_y = draws.offset_y[positions].astype(np.float32) / scale
        mirror = draws.flip[positions].astype(np.int32)
        shift = channel_shift(draws.alpha[positions], self.spec)
        return jpegs, labels, indices, crop_x, crop_y, mirror, shift


def normalize(images, spec: AugmentSpec, device: str, shift=None, mirror=0, crop_at=None):
    """Flip, lighting and mean subtraction of decoded images -> float32 CHW (one description
    for train and val): ``(pixel - shift - mean_image) / channel_std``.

    ``shift`` defaults to the channel mean (no lighting); ``crop_at`` (x, y)
    crops a patch first, for the ten-crop path that decodes whole images.
    """
    arguments = {}
    if crop_at is not None:
        arguments = {
            "crop": (spec.crop_size, spec.crop_size),
            "crop_pos_x": crop_at[0] / spec.max_offset,
            "crop_pos_y": crop_at[1] / spec.max_offset,
        }
    patches = fn.crop_mirror_normalize(
        images,
        mean=list(spec.channel_mean) if shift is None else shift,
        std=list(spec.channel_std),
        mirror=mirror,
        dtype=types.FLOAT,
        output_layout="CHW",
        device=device,
        **arguments,
    )
    mean_image = mean_image_chw(spec)
    if mean_image is not None:
        patches = patches - types.Constant(mean_image, device=device)
    return patches


def _decoder_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


@pipeline_def
def train_pipeline(feeder: BatchFeeder, spec: AugmentSpec, device: str):
    """Random 224 crop (ROI decode), flip, PCA lighting, mean subtraction."""
    jpegs, labels, indices, crop_x, crop_y, mirror, shift = fn.external_source(
        source=feeder, num_outputs=7, batch=True
    )
    images = fn.decoders.image_crop(
        jpegs,
        device=_decoder_device(device),
        output_type=types.RGB,
        crop=(spec.crop_size, spec.crop_size),
        crop_pos_x=crop_x,
        crop_pos_y=crop_y,
    )
    return normalize(images, spec, device, shift=shift, mirror=mirror), labels, indices


@pipeline_def
def val_pipeline(feeder: BatchFeeder, spec: AugmentSpec, device: str, ten_crop: bool):
    """Central 224 crop, or the paper's ten patches (N×10×3×224×224); no randomness."""
    jpegs, labels, indices = fn.external_source(source=feeder, num_outputs=3, batch=True)
    if not ten_crop:
        images = fn.decoders.image_crop(
            jpegs,
            device=_decoder_device(device),
            output_type=types.RGB,
            crop=(spec.crop_size, spec.crop_size),
            crop_pos_x=0.5,
            crop_pos_y=0.5,
        )
        return normalize(images, spec, device), labels, indices
    images = fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB)
    patches = [
        normalize(images, spec, device, mirror=int(mirrored), crop_at=(x, y))
        for x, y, mirrored in ten_crop_geometry(spec)
    ]
    return fn.stack(*patches, axis=0), labels, indices


def decode_only_pipeline(feeder, **pipeline_arguments):
    """Decoding alone, the upper bound of any CPU loader (used by the benchmark)."""

    @pipeline_def
    def decode_only(device: str):
        jpegs, _labels, _indices = fn.external_source(source=feeder, num_outputs=3, batch=True)
        return fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB)

    return decode_only(**pipeline_arguments)


def _to_torch(tensor_list, device: torch.device, copy: bool) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on ``device``.

    With DALI's dynamic executor an output stays valid for as long as it is
    referenced, so it is handed over through DLPack without a copy (a fresh
    77 MB torch allocation per batch of 128 costs more than the decoding
    of a few dozen images, in page faults alone). Otherwise it is copied.
    """
    dense = tensor_list.as_tensor()
    tensor = to_torch_tensor(dense, copy=copy)
    return tensor if tensor.device == device else tensor.to(device)


class DaliLoader(EpochLoader):
    """SPEC §6 loader on DALI; the pipeline is built once and reused every epoch."""

    def __init__(self, table, spec, config, draw, staged=None):
        super().__init__(table, spec, config, draw, staged)
        self._feeder = BatchFeeder(self.reader(), spec, config.is_train)
        arguments = {
            "batch_size": config.batch_size,
            "num_threads": max(1, config.num_threads),
            "device_id": self.torch_device.index,  # None on the CPU
            "prefetch_queue_depth": PREFETCH_QUEUE_DEPTH,
            "seed": config.seed,
        }
        if config.is_train:
            self._pipeline = train_pipeline(self._feeder, spec, config.device, **arguments)
        else:
            self._pipeline = val_pipeline(
                self._feeder, spec, config.device, config.ten_crop, **arguments
            )
        self._pipeline.build()

    def _run(self, plan: EpochPlan, first_batch: int, draws):
        leases = self.leases(plan, first_batch)
        self._feeder.start(plan, first_batch, draws, leases)
        finished = False
        try:
            while True:
                try:
                    images, labels, indices = self._pipeline.run()
                except StopIteration:
                    finished = True
                    return
                copy = not self._pipeline.exec_dynamic
                yield tuple(
                    _to_torch(output, self.torch_device, copy)
                    for output in (images, labels, indices)
                )
        finally:
            if not finished:
                self._feeder.stop()
            try:
                self._finish_epoch(drain=not finished)
            finally:
                leases.close()

    def close(self) -> None:
        """Also shut the DALI pipeline down (its threads and buffers); closing again does
        nothing."""
        super().close()
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline._shutdown()  # what Pipeline.__del__ does; DALI has no public close

    def _finish_epoch(self, drain: bool) -> None:
        """Make the pipeline ready for the next epoch.

        An epoch abandoned mid-way still has prefetched batches queued; they
        are run out (the feeder is stopped, so at most the queue depth) so
        that none leaks into the next epoch.
        """
        try:
            while drain:
                try:
                    self._pipeline.run()
                except StopIteration:
                    break
            self._pipeline.reset()
        except Exception:
            # A generator finalized at interpreter exit can outlive DALI's backend.
            if sys.is_finalizing():
                return
            raise
