"""Tools over a loader: its throughput (``alexpipe bench-loader``) and a look at what
it feeds the trainer (``alexpipe preview``)."""

from __future__ import annotations

import time

import numpy as np

from pipeline.load.base import EpochLoader
from pipeline.load.loader import create_loader
from shards.errors import UserError


def measure_throughput(loader: EpochLoader, batches: int, warmup: int = 2) -> dict:
    """Images per second over ``batches`` batches, after ``warmup`` batches (start-up, prefetch).

    Runs through as many epochs as needed; the clock starts when the last
    warm-up batch has arrived and covers the waits for every measured batch.
    """
    if batches < 1:
        raise UserError("measure at least one batch")
    images = measured = 0
    started = time.perf_counter() if warmup <= 0 else None
    while measured < batches:
        for batch in loader:
            if started is None:
                warmup -= 1
                if warmup == 0:
                    started = time.perf_counter()
                continue
            images += len(batch[1])
            measured += 1
            if measured == batches:
                break
    seconds = time.perf_counter() - started
    return {
        "img_per_s": images / seconds,
        "images": images,
        "batches": measured,
        "seconds": seconds,
    }


def preview_images(shards_dir, count: int = 16, seed: int = 0, **loader_arguments) -> np.ndarray:
    """The first ``count`` train images as the trainer sees them, denormalized to uint8 HWC.

    Crops, flips and lighting are kept; only the mean subtraction and
    scaling are undone (:func:`pipeline.load.augment.denormalize`).
    """
    from pipeline.load.augment import denormalize

    loader = create_loader(shards_dir, "train", batch_size=count, seed=seed, **loader_arguments)
    try:
        images, _labels = next(iter(loader))
        return denormalize(images.cpu().numpy(), loader.spec)
    finally:
        loader.close()
