"""Checkpoints: one plain dict in RUN/checkpoint.pt, replaced atomically.

The dict (see :func:`trainer.run` for who fills it)::

    {"format": "alexpipe-checkpoint/2",
     "model": single-device AlexNet state dict (also for --parallel columns),
     "optimizer", "scheduler": their state dicts (the scheduler is torch's
         ReduceLROnPlateau or MultiStepLR, see trainer.schedule),
     "epoch": epochs completed, "batch_in_epoch": batches done of the next,
     "step": optimizer steps done,
     "loss_window": partial sums of the metrics row being accumulated,
     "rng": [per rank: python, numpy, torch (and cuda) generator states],
     "loader": [per rank: the train loader's state_dict() or None],
     "config": TrainConfig fields, "world_size", "num_classes"}

The file is written to a hidden temporary name beside it, fsynced, and
renamed over ``checkpoint.pt``: a crash at any moment leaves the previous
checkpoint intact. Everything in it is a tensor or a plain Python value, so
it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy
import torch

from shards.atomic import atomic_file
from shards.errors import UserError

FORMAT = "alexpipe-checkpoint/2"
# Format 1 kept the schedule in a hand-written dict that torch's schedulers cannot
# load. Its weights are the same: `alexpipe eval` still reads it, --resume does not.
OLD_FORMATS = ("alexpipe-checkpoint/1",)
CHECKPOINT_NAME = "checkpoint.pt"


def capture_rng_state() -> dict:
    """This process's random generator states, as plain values and tensors."""
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(numpy.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the states saved by :func:`capture_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved_numpy = state["numpy"]
    numpy.random.set_state(
        (
            saved_numpy["kind"],
            saved_numpy["keys"].numpy().astype(numpy.uint32),
            saved_numpy["position"],
            saved_numpy["has_gauss"],
            saved_numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_file(Path(path), "wb") as handle:
        torch.save(checkpoint, handle)


def load_checkpoint(path: Path, for_resume: bool = True) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    A checkpoint of an older format is refused when it is to be resumed
    (``for_resume``) and accepted for its weights otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file: say so in one line
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__})") from error
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found in OLD_FORMATS:
        if not for_resume:
            return checkpoint
        raise UserError(
            f"cannot resume {path}: it is in the old format {found}, whose schedule state "
            f"this version cannot load; start a new run (alexpipe eval still reads its weights)"
        )
    if found != FORMAT:
        raise UserError(f"{path} is not an alexpipe checkpoint (expected format {FORMAT})")
    return checkpoint
