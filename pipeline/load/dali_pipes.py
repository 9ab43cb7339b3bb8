"""DALI pipelines for training and validation, and the loader that drives them.

Samples enter through ``fn.external_source``, fed batch by batch from our own
epoch plan (``pipeline.load.epochs``) with the bytes read by offset through the
DALI index files. DALI's webdataset reader would shard by padding or
duplicating samples and its shuffle is not reproducible per epoch; feeding
the plan gives the loader's exact semantics (every sample once per epoch over
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

On the GPU, JPEGs are decoded by nvJPEG ("mixed") with libjpeg-turbo's
"fancy" chroma upsampling, so that 4:2:0 shards give the CPU decoder's
pixels, and labels and indices are copied to the GPU inside the pipeline: all
outputs arrive on the device, with no blocking copy in ``next(loader)``.

The epoch is run by DALI's ``DALIGenericIterator`` over the pipeline, with
no ``reader_name`` and no size: the feeder's ``StopIteration`` ends the epoch
and its last, smaller batch is delivered as it is (the policy of
``LastBatchPolicy.PARTIAL``, decided by the plan). Against the hand-written
``Pipeline.run()`` loop it replaced (DLPack hand-over, drain and reset of our
own) it measured the same: 1536 against 1389 img/s, 861 against 845 img/CPU-s,
median paired ratio 1.02 (train, batch 128, 2 threads, 2000 synthetic images;
``tools/bench_loader.py``'s ``time_batches``, 10 alternating rounds in one process).

Remote shards: the feeder's sample reader stages each shard on its first read
(``pipeline.load.staging``); the feeder itself does not know where shards are.
"""

from __future__ import annotations

import sys

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.load.augment import AugmentSpec, channel_shift, mean_image_chw, ten_crop_geometry
from pipeline.load.base import EpochLoader
from pipeline.load.epochs import EpochPlan
from pipeline.load.interface import Device
from pipeline.load.samples import SampleReader

PREFETCH_QUEUE_DEPTH = 2
OUTPUT_NAMES = ("images", "labels", "indices")


class BatchFeeder:
    """The external source callback: one planned batch per call, StopIteration at the end."""

    def __init__(self, reader: SampleReader, spec: AugmentSpec, train: bool):
        self.reader = reader
        self.spec = spec
        self.train = train
        self._batches = iter(())
        self._draws = None

    def start(self, plan: EpochPlan, first_batch: int, draws) -> None:
        """Feed batches ``first_batch..`` of ``plan`` (with ``draws`` for train) from now on."""
        self._batches = (plan.batch(number) for number in range(first_batch, plan.num_batches))
        self._draws = draws

    def stop(self) -> None:
        """End the epoch early: every further call raises StopIteration."""
        self._batches = iter(())

    def __call__(self):
        positions = next(self._batches)  # StopIteration: the epoch is over
        samples = [self.reader.read(int(position)) for position in positions]
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


def decode(jpegs, device: str, **window):
    """JPEG bytes -> uint8 HWC RGB on ``device`` ("cpu" or "gpu"): the whole image, or only
    a ``window`` (``crop``, ``crop_pos_x``, ``crop_pos_y`` of ``decoders.image_crop``).

    ``jpeg_fancy_upsampling``: nvJPEG's default chroma upsampling differs
    from libjpeg-turbo's on 4:2:0 images (the shards are 4:2:0); on the CPU
    it changes nothing.
    """
    decoder = fn.decoders.image_crop if window else fn.decoders.image
    return decoder(
        jpegs,
        device=_decoder_device(device),
        output_type=types.RGB,
        jpeg_fancy_upsampling=True,
        **window,
    )


def on_device(device: str, *outputs):
    """The pipeline's outputs, all on ``device``: on the GPU, labels and indices are copied
    there by DALI, with the images, instead of by a blocking copy after each batch."""
    return tuple(output.gpu() if device == "gpu" else output for output in outputs)


@pipeline_def
def train_pipeline(feeder: BatchFeeder, spec: AugmentSpec, device: str):
    """Random 224 crop (ROI decode), flip, PCA lighting, mean subtraction."""
    jpegs, labels, indices, crop_x, crop_y, mirror, shift = fn.external_source(
        source=feeder, num_outputs=7, batch=True
    )
    size = (spec.crop_size, spec.crop_size)
    images = decode(jpegs, device, crop=size, crop_pos_x=crop_x, crop_pos_y=crop_y)
    images = normalize(images, spec, device, shift=shift, mirror=mirror)
    return on_device(device, images, labels, indices)


@pipeline_def
def val_pipeline(feeder: BatchFeeder, spec: AugmentSpec, device: str, ten_crop: bool):
    """Central 224 crop, or the paper's ten patches (N×10×3×224×224); no randomness."""
    jpegs, labels, indices = fn.external_source(source=feeder, num_outputs=3, batch=True)
    if not ten_crop:
        size = (spec.crop_size, spec.crop_size)
        images = decode(jpegs, device, crop=size, crop_pos_x=0.5, crop_pos_y=0.5)
        return on_device(device, normalize(images, spec, device), labels, indices)
    images = decode(jpegs, device)
    patches = [
        normalize(images, spec, device, mirror=int(mirrored), crop_at=(x, y))
        for x, y, mirrored in ten_crop_geometry(spec)
    ]
    return on_device(device, fn.stack(*patches, axis=0), labels, indices)


def decode_only_pipeline(feeder, **pipeline_arguments):
    """Decoding alone, the upper bound of any CPU loader (used by the benchmark)."""

    @pipeline_def
    def decode_only(device: str):
        jpegs, _labels, _indices = fn.external_source(source=feeder, num_outputs=3, batch=True)
        return decode(jpegs, device)

    return decode_only(**pipeline_arguments)


class DaliLoader(EpochLoader):
    """The loader on DALI; the pipeline is built once and reused every epoch."""

    def __init__(self, table, spec, config, draw, cache=None):
        super().__init__(table, spec, config, draw, cache)
        self._feeder = BatchFeeder(self.reader(), spec, config.is_train)
        device = "gpu" if config.device is Device.CUDA else "cpu"
        arguments = {
            "batch_size": config.batch_size,
            "num_threads": max(1, config.num_threads),
            "device_id": self.torch_device.index,  # None on the CPU
            "prefetch_queue_depth": PREFETCH_QUEUE_DEPTH,
            "seed": config.seed,
        }
        if config.is_train:
            pipeline = train_pipeline(self._feeder, spec, device, **arguments)
        else:
            pipeline = val_pipeline(self._feeder, spec, device, config.ten_crop, **arguments)
        # Builds the pipeline; the first batch waits for an epoch's plan in the feeder.
        self._batches = DALIGenericIterator(pipeline, list(OUTPUT_NAMES), prepare_first_batch=False)
        self._pipeline = pipeline
        self._ended = False  # the pipeline has run out of an epoch and needs a reset

    def _run(self, plan: EpochPlan, first_batch: int, draws):
        self._feeder.start(plan, first_batch, draws)
        if self._ended:
            # Only now: reset() already schedules the first runs, which read from the feeder.
            self._batches.reset()
            self._ended = False
        try:
            while (outputs := self._next_batch()) is not None:
                yield tuple(outputs[name] for name in OUTPUT_NAMES)
        finally:
            if not self._ended:
                # Abandoned: run out what was prefetched (the feeder stopped: at most the queue
                # depth) so that none of it leaks into the next epoch.
                self._feeder.stop()
                self._drain()

    def _next_batch(self) -> dict[str, torch.Tensor] | None:
        """The next batch of the epoch, or None (and the pipeline marked as ended) after it.

        ``next()`` rather than a for loop: ``iter()`` of DALI's iterator resets it.
        """
        try:
            (outputs,) = next(self._batches)  # one pipeline
        except StopIteration:
            self._ended = True
            return None
        return outputs

    def _drain(self) -> None:
        try:
            while self._next_batch() is not None:
                pass
        except Exception:
            # A generator finalized at interpreter exit can outlive DALI's backend.
            if sys.is_finalizing():
                return
            raise

    def close(self) -> None:
        """Also shut the DALI pipeline down (its threads and buffers, freed with the last
        reference to it); closing again does nothing."""
        super().close()
        self._batches = self._pipeline = None
