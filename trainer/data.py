"""The one place the trainer gets its data: :mod:`pipeline.loader` (SPEC §6).

The training loop itself accepts any iterable of ``(images, labels)``
batches with a ``len()``; these functions build the real ones. The train
loader may offer ``state_dict()`` / ``load_state_dict(state)`` (its position:
the epoch and the batches already handed out) for exact mid-epoch resume;
without them the trainer replays the epoch and skips the batches done.
"""

from __future__ import annotations

from pathlib import Path

from shards.errors import UserError


def loader_device(device: str) -> str:
    """The loader's name for a trainer device ("cuda" -> "gpu")."""
    return "gpu" if device == "cuda" else "cpu"


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """The global batch divided over the processes (it must divide evenly)."""
    if batch_size % world_size:
        raise UserError(
            f"--batch-size {batch_size} is the global batch; it must divide evenly "
            f"over {world_size} processes"
        )
    return batch_size // world_size


def num_classes_in(shards_dir: str | Path) -> int:
    """Number of classes in a shard directory's manifest."""
    from shards.manifest import load_manifest, num_classes

    return num_classes(load_manifest(Path(shards_dir)))


def has_split(shards_dir: str | Path, split: str) -> bool:
    """True if the shards hold a non-empty ``split``."""
    from shards.manifest import load_manifest

    splits = load_manifest(Path(shards_dir)).get("splits", {})
    return splits.get(split, {}).get("num_samples", 0) > 0


def make_loaders(config, rank: int, world_size: int) -> tuple[object, object | None]:
    """Train and val loaders of this rank for a :class:`TrainConfig` (val: None if absent).

    On GPU, call after ``torch.cuda.set_device`` so the loader runs on this
    process's GPU.
    """
    from pipeline.loader import create_loader

    common = {
        "batch_size": per_process_batch_size(config.batch_size, world_size),
        "backend": config.backend,
        "device": loader_device(config.device),
        "rank": rank,
        "world_size": world_size,
        "seed": config.seed,
        "num_threads": config.num_threads,
        "normalize": config.normalize,
        "lighting_std": config.lighting_std,
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
):
    """The val loader for ``alexpipe eval`` (one process)."""
    from pipeline.loader import create_loader

    if not has_split(shards_dir, "val"):
        raise UserError(f"{shards_dir} has no val split to evaluate on")
    return create_loader(
        shards_dir,
        split="val",
        batch_size=batch_size,
        backend=backend,
        device=loader_device(device),
        num_threads=num_threads,
        normalize=normalize,
        ten_crop=ten_crop,
    )
