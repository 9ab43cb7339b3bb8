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

The epoch is our own ``Pipeline.run()`` loop, not DALI's ``DALIGenericIterator``:
the iterator copies each output into torch buffers of its own (7 ms for a
batch of 128 at 224x224, float32, 77 MB, on one core), where DALI's dynamic
executor lets an output go to torch through DLPack without a copy
(:func:`dali_to_torch`). Measured on real-photograph shards (train, batch
128, 2 threads, 4 alternating rounds of ``tools/bench_loader.py``'s
``time_batches``): 1912 against 1835 img/s, 1000 against 969 img/CPU-s. The
feeder's ``StopIteration`` ends the epoch and its last, smaller batch is
delivered as it is (decided by the plan).

Remote shards: the feeder's sample reader stages each shard on its first read
(``pipeline.load.staging``); the feeder itself does not know where shards are.
"""

from __future__ import annotations

import itertools

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def

from pipeline.load.augment import AugmentSpec, channel_shift, mean_image_chw, ten_crop_geometry
from pipeline.load.base import EpochLoader
from pipeline.load.epochs import EpochPlan
from pipeline.load.interface import Device
from pipeline.load.samples import SampleReader

PREFETCH_QUEUE_DEPTH = 2


class BatchFeeder:
    """The external source callback: one planned batch per call, StopIteration at the end."""

    def __init__(self, reader: SampleReader, spec: AugmentSpec, train: bool):
        self.reader = reader
        self.spec = spec
        self.train = train
        self._batches = iter(())
        self._draws = None

    def start(
        self,
        plan: EpochPlan,
        first_batch: int,
        draws,
        first_positions: np.ndarray | None = None,
    ) -> None:
        """Feed batches ``first_batch..`` of ``plan`` (with ``draws`` for train) from now on;
        ``first_positions``, if given, are fed as batch ``first_batch`` instead of the
        plan's (a failed batch without its bad samples)."""
        batches = (plan.batch(number) for number in range(first_batch, plan.num_batches))
        if first_positions is not None:
            next(batches, None)
            batches = itertools.chain([first_positions], batches)
        self._batches = batches
        self._draws = draws

    def stop(self) -> None:
        """End the epoch early: every further call raises StopIteration."""
        self._batches = iter(())

    def __call__(self):
        return self.inputs(next(self._batches))  # StopIteration: the epoch is over

    def inputs(self, positions: np.ndarray) -> tuple:
        """The external source's outputs for the samples at ``positions``: JPEG bytes,
        labels, indices, and for train their crop, flip and lighting draws."""
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


class SampleSource:
    """The external source of a probe pipeline: the inputs set before each run."""

    def __init__(self):
        self.inputs: tuple | None = None

    def __call__(self) -> tuple:
        return self.inputs


def dali_error_reason(error: Exception) -> str:
    """The words of a DALI pipeline error after "encountered:" (e.g. ``nvImageCodec
    failure: '#4'``), without the operator's traceback and "no longer valid"."""
    text = str(error)
    _, found, after = text.rpartition("encountered:")
    lines = [line.strip() for line in (after if found else text).splitlines()]
    words = [line for line in lines if line and "pipeline object is no longer valid" not in line]
    return words[0] if words else type(error).__name__


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


def dali_to_torch(output, copy: bool) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on the same device: handed over through DLPack
    without a copy, as DALI's dynamic executor keeps an output valid while it is referenced
    (otherwise copied)."""
    dense = output.as_tensor()
    return torch.from_dlpack(dense).clone() if copy else torch.from_dlpack(dense)


class DaliLoader(EpochLoader):
    """The loader on DALI; the pipeline is built once and reused every epoch.

    A batch that fails in the pipeline (DALI raises it from ``next()``, with
    the decoder's words, and calls the pipeline "no longer valid") is decoded
    again sample by sample through a probe: the same pipeline at batch size 1,
    fed each sample with its own draws. The samples that fail there go to the
    loader's bad-sample policy, which stops the run or skips them; when it
    skips, a new pipeline continues the epoch at the failed batch, without
    them. If every sample passes alone, the pipeline's error is raised as it
    is. None of this runs on a batch that does not fail.
    """

    def __init__(self, table, spec, config, draw, cache=None, **options):
        super().__init__(table, spec, config, draw, cache, **options)
        self._feeder = BatchFeeder(self.reader(), spec, config.is_train)
        self._device = "gpu" if config.device is Device.CUDA else "cpu"
        self._start_pipeline()

    def _make_pipeline(self, source, batch_size: int, prefetch_queue_depth: int, num_threads: int):
        """This loader's train or val pipeline over ``source`` (built on first use)."""
        config = self.config
        arguments = {
            "batch_size": batch_size,
            "num_threads": num_threads,
            "device_id": self.torch_device.index,  # None on the CPU
            "prefetch_queue_depth": prefetch_queue_depth,
            "seed": config.seed,
        }
        if config.is_train:
            return train_pipeline(source, self.spec, self._device, **arguments)
        return val_pipeline(source, self.spec, self._device, config.ten_crop, **arguments)

    def _start_pipeline(self) -> None:
        """A new pipeline over the feeder (its first run waits for an epoch's plan in the
        feeder)."""
        self._pipeline = None  # a failed pipeline goes first
        config = self.config
        pipeline = self._make_pipeline(
            self._feeder, config.batch_size, PREFETCH_QUEUE_DEPTH, max(1, config.num_threads)
        )
        pipeline.build()
        self._pipeline = pipeline
        self._ended = False  # the pipeline has run out of an epoch and needs a reset
        self._failed = False  # the pipeline raised an error: replace it before further use

    def _run(self, plan: EpochPlan, first_batch: int, draws):
        self._feeder.start(plan, first_batch, draws)
        if self._failed:
            self._start_pipeline()
        elif self._ended:
            self._pipeline.reset()
            self._ended = False
        number, retried = first_batch, None
        try:
            while True:
                try:
                    outputs = self._next_batch()
                except Exception as error:  # how DALI reports a batch that failed in it
                    self._failed = True
                    if retried == number:
                        raise  # the batch failed again without its bad samples
                    retried = number
                    self._skip_bad_samples(error, plan, number, draws)
                    continue
                if outputs is None:
                    break
                yield outputs
                number += 1
        finally:
            if not self._ended and not self._failed:
                # Abandoned: run out what was prefetched (the feeder stopped: at most the queue
                # depth) so that none of it leaks into the next epoch.
                self._feeder.stop()
                self._drain()

    def _skip_bad_samples(self, error: Exception, plan: EpochPlan, number: int, draws):
        """After batch ``number`` failed with ``error``: find its bad samples, hand them to
        the policy (which raises to stop), and continue the epoch on a new pipeline at
        that batch without them. Raises ``error`` if no sample fails alone."""
        positions = plan.batch(number)
        bad = self._probe(positions)
        if not bad:
            raise error
        self.bad_batch(number, bad, left=len(positions) - len(bad))
        remaining = positions[~np.isin(positions, [sample.position for sample in bad])]
        self._feeder.start(plan, number, draws, first_positions=remaining)
        self._start_pipeline()

    def _probe(self, positions: np.ndarray) -> list:
        """The samples at ``positions`` that fail this loader's pipeline alone, as
        :class:`~pipeline.load.bad_samples.BadSample` (with the feeder's draws)."""
        source, probe, bad = SampleSource(), None, []
        for position in positions:
            if probe is None:
                probe = self._make_pipeline(source, 1, prefetch_queue_depth=1, num_threads=1)
                probe.build()
            source.inputs = self._feeder.inputs(positions[positions == position])
            try:
                probe.run()
            except Exception as error:  # this sample's failure, in DALI's words
                reason = dali_error_reason(error)
                bad.append(self._feeder.reader.describe(int(position), reason))
                probe = None  # "no longer valid": the next sample gets a new one
        return bad

    def _next_batch(self) -> tuple[torch.Tensor, ...] | None:
        """The next batch of the epoch, ``(images, labels, indices)``, or None (and the
        pipeline marked as ended) after it."""
        try:
            outputs = self._pipeline.run()
        except StopIteration:
            self._ended = True
            return None
        copy = not self._pipeline.exec_dynamic
        return tuple(dali_to_torch(output, copy) for output in outputs)

    def _drain(self) -> None:
        """Run out the batches an abandoned epoch prefetched, for nothing.

        One that fails here (a bad sample ahead, or DALI's backend gone at
        interpreter exit) marks the pipeline for replacement instead of
        raising: an error from here would replace the one that ended the epoch.
        """
        try:
            while self._next_batch() is not None:
                pass
        except Exception:
            self._failed = True

    def close(self) -> None:
        """Also shut the DALI pipeline down (its threads and buffers, freed with the last
        reference to it); closing again does nothing."""
        super().close()
        self._pipeline = None
