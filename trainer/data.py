"""The one place the trainer gets its data: :mod:`pipeline.load.loader` (README, "Real use").

The training loop itself accepts any iterable of ``(images, labels)``
batches with a ``len()``; these functions build the real ones. The train
loader may offer ``state_dict()`` / ``load_state_dict(state)`` (its position:
the epoch and the batches already handed out) for exact mid-epoch resume;
without them the trainer replays the epoch and skips the batches done.

Shard locations may be remote (``http(s)://``, ``s3://``, ``pipe:``): each
process then stages shards into its own cache, ``CACHE_DIR/rank-N`` (N: the
process's rank on its node) with ``CACHE_SIZE`` split evenly among the
node's processes (:func:`cache_options`); the train and val loaders of a
process share it.
"""

from __future__ import annotations

import os
from pathlib import Path

from shards.errors import UserError


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """The global batch divided over the processes (it must divide evenly)."""
    if batch_size % world_size:
        raise UserError(
            f"--batch-size {batch_size} is the global batch; it must divide evenly "
            f"over {world_size} processes"
        )
    return batch_size // world_size


def num_classes_in(shards_dir: str | Path) -> int:
    """Number of classes in the manifest of a shard directory or remote location."""
    from shards.remote import read_manifest

    return read_manifest(shards_dir).num_classes


def has_split(shards_dir: str | Path, split: str) -> bool:
    """True if the shards (a directory or remote location) hold a non-empty ``split``."""
    from shards.remote import read_manifest

    return read_manifest(shards_dir).has_samples(split)


def local_position(rank: int, world_size: int) -> tuple[int, int]:
    """(this process's rank on its node, processes on the node).

    Under torchrun from ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``; otherwise all
    processes are local (``--nproc``, or one process).
    """
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return rank, world_size


def cache_options(config, rank: int, world_size: int) -> dict:
    """``cache_dir`` and ``cache_bytes`` of this process for :func:`create_loader`.

    ``CACHE_DIR/rank-{local rank}`` (a cache directory belongs to one
    process) and ``CACHE_SIZE`` divided by the processes of the node. Unset:
    a temporary directory and the loader's default size.
    """
    from shards.sizes import parse_size

    local_rank, local_world_size = local_position(rank, world_size)
    cache_dir = None
    if config.cache_dir:
        cache_dir = str(Path(config.cache_dir).expanduser() / f"rank-{local_rank}")
    cache_bytes = None
    if config.cache_size:
        cache_bytes = parse_size(config.cache_size) // max(1, local_world_size)
    return {"cache_dir": cache_dir, "cache_bytes": cache_bytes}


def make_loaders(config, rank: int, world_size: int) -> tuple[object, object | None]:
    """Train and val loaders of this rank for a :class:`TrainConfig` (val: None if absent).

    On GPU, call after ``torch.cuda.set_device`` so the loader runs on this
    process's GPU.
    """
    from pipeline.load.loader import create_loader

    common = {
        "batch_size": per_process_batch_size(config.batch_size, world_size),
        "backend": config.backend,
        "device": config.device,
        "rank": rank,
        "world_size": world_size,
        "seed": config.seed,
        "num_threads": config.num_threads,
        "normalize": config.normalize,
        "lighting_std": config.lighting_std,
        "on_bad_sample": config.on_bad_sample,
        **cache_options(config, rank, world_size),
    }
    train_loader = create_loader(config.shards_dir, split="train", **common)
    val_loader = None
    if has_split(config.shards_dir, "val"):
        val_loader = create_loader(config.shards_dir, split="val", **common)
    return train_loader, val_loader


def make_eval_loader(
    shards_dir: str | Path,
    *,
    batch_size: int,
    backend: str,
    device: str,
    normalize: str,
    ten_crop: bool,
    num_threads: int = 2,
    cache_dir: str | None = None,
    cache_size: str | None = None,
):
    """The val loader for ``alexpipe eval`` (one process; ``cache_dir`` is used as is)."""
    from pipeline.load.loader import create_loader
    from shards.sizes import parse_size

    if not has_split(shards_dir, "val"):
        raise UserError(f"{shards_dir} has no val split to evaluate on")
    return create_loader(
        shards_dir,
        split="val",
        batch_size=batch_size,
        backend=backend,
        device=device,
        num_threads=num_threads,
        normalize=normalize,
        ten_crop=ten_crop,
        cache_dir=cache_dir,
        cache_bytes=parse_size(cache_size) if cache_size else None,
    )
