"""``alexpipe eval``: the error of a saved network on the val split."""

from __future__ import annotations

from pathlib import Path

import torch

from shards.errors import UserError
from trainer.checkpoint import load_checkpoint
from trainer.config import default_device
from trainer.engine import evaluate
from trainer.model import AlexNet


def network_from_checkpoint(checkpoint: dict, device: str) -> AlexNet:
    """The single-device AlexNet of a checkpoint, on ``device``, in eval mode."""
    saved_config = checkpoint["config"]
    network = AlexNet(checkpoint["num_classes"], width=saved_config.get("width", 1.0))
    network.load_state_dict(checkpoint["model"])
    return network.to(device).eval()


def evaluate_checkpoint(
    shards_dir: str | Path,
    checkpoint_path: str | Path,
    *,
    ten_crop: bool = False,
    backend: str = "dali",
    device: str | None = None,
    batch_size: int = 128,
    num_threads: int = 2,
    cache_dir: str | None = None,
    cache_size: str | None = None,
    loader=None,
) -> dict:
    """``{"top1_err", "top5_err", "val_loss", "num_images"}`` of a checkpoint on val.

    The images are normalized as the run was trained (its ``normalize``).
    ``loader`` replaces the shard loader (tests); ``device`` defaults to
    CUDA when available. ``cache_dir``/``cache_size`` stage remote shards
    (http(s)://, s3://, pipe:) through a verified local cache.
    """
    device = device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu)")
    checkpoint = load_checkpoint(Path(checkpoint_path), for_resume=False)
    network = network_from_checkpoint(checkpoint, device)
    if loader is None:
        from trainer.data import make_eval_loader

        loader = make_eval_loader(
            shards_dir,
            batch_size=batch_size,
            backend=backend,
            device=device,
            normalize=checkpoint["config"]["normalize"],
            ten_crop=ten_crop,
            num_threads=num_threads,
            cache_dir=cache_dir,
            cache_size=cache_size,
        )
    results = evaluate(network, loader, device)
    if results is None:
        raise UserError(f"the val split of {shards_dir} has no images")
    return results
