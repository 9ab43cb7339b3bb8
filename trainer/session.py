"""The state of a training process, and how it goes into and out of a checkpoint.

A :class:`TrainingSession` bundles what the loop needs (model, optimizer,
schedule, loaders, where the run stands); :func:`save_session` and
:func:`restore_session` turn it into the checkpoint dict of
:mod:`trainer.checkpoint` and back, including every rank's random
generators and loader position, so that a resumed run repeats exactly what
the uninterrupted run would have done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.load.interface import ResumableLoader
from shards.errors import UserError
from trainer.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from trainer.columns import ColumnAlexNet
from trainer.config import RESUME_INVARIANTS, TrainConfig
from trainer.distributed import DistributedContext, gather_objects
from trainer.health import DivergenceGuard
from trainer.metrics import MetricsLog
from trainer.schedule import Schedule


@dataclass
class Position:
    """Where the run stands: epochs completed, batches done of the next, steps done."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0


@dataclass
class LossWindow:
    """Sums over the steps since the last metrics row.

    The loss sum stays on the device so that steps never wait for the GPU;
    it is read only when a row is written (or a checkpoint taken).
    """

    loss_sum: torch.Tensor | float = 0.0
    steps: int = 0
    images: int = 0
    wait_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, images: int, wait_seconds: float) -> None:
        self.loss_sum = self.loss_sum + loss.detach().double()
        self.steps += 1
        self.images += images
        self.wait_seconds += wait_seconds

    def restart(self) -> None:
        """Start a new window (after a row was written)."""
        self.loss_sum, self.steps, self.images, self.wait_seconds = 0.0, 0, 0, 0.0
        self.started = time.perf_counter()

    def restart_timer(self) -> None:
        """Forget time spent outside training (evaluation, checkpoints) but keep the sums."""
        self.images, self.wait_seconds = 0, 0.0
        self.started = time.perf_counter()


@dataclass
class TrainingSession:
    """Everything one process's training loop works with."""

    config: TrainConfig
    context: DistributedContext
    network: nn.Module  # AlexNet or ColumnAlexNet: owns the weights, used for evaluation
    model: nn.Module  # what a training step calls: network, DDP(network) and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: Schedule  # torch's ReduceLROnPlateau or MultiStepLR
    train_loader: object
    val_loader: object | None
    out_dir: Path
    steps_per_epoch: int
    metrics: MetricsLog | None = None  # rank 0 only
    position: Position = field(default_factory=Position)
    window: LossWindow = field(default_factory=LossWindow)
    pending_rng: dict | None = None  # restored once a resumed mid-epoch iteration runs
    skip_batches: int = 0  # for loaders without load_state_dict: batches to drop on resume
    skipped: list[dict] = field(default_factory=list)  # bad samples' rows, not yet written
    guard: DivergenceGuard | None = None  # stops a run that can no longer learn
    saved_step: int | None = None  # the step of the checkpoint on disk, if any

    @property
    def device(self) -> torch.device:
        return torch.device(self.context.device)


def single_device_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The weights in the single-device AlexNet layout, on the CPU."""
    if isinstance(network, ColumnAlexNet):
        return network.single_state_dict()
    return {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}


def load_single_device_state(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load single-device AlexNet weights into ``network`` (either layout)."""
    if isinstance(network, ColumnAlexNet):
        network.load_single_state_dict(state)
    else:
        network.load_state_dict(state)


def loader_state(loader) -> dict | None:
    """The loader's own position, if it can tell."""
    return loader.state_dict() if isinstance(loader, ResumableLoader) else None


def save_session(session: TrainingSession) -> None:
    """Write RUN/checkpoint.pt. Collective: every rank must call it at the same step."""
    context = session.context
    # Dropout masks and augmentation streams differ per rank, so each rank's
    # generators and loader position are kept.
    gathered = gather_objects((capture_rng_state(), loader_state(session.train_loader)), context)
    rng_states = [rng for rng, _ in gathered]
    loader_states = [loader for _, loader in gathered]
    session.saved_step = session.position.step
    if not context.is_main:
        return
    window = session.window
    checkpoint = {
        "format": FORMAT,
        "model": single_device_state(session.network),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.schedule.state_dict(),
        "epoch": session.position.epoch,
        "batch_in_epoch": session.position.batch_in_epoch,
        "step": session.position.step,
        "loss_window": {"loss_sum": float(window.loss_sum), "steps": window.steps},
        "rng": rng_states,
        "loader": loader_states,
        "config": session.config.to_dict(),
        "world_size": context.world_size,
        "num_classes": session.config.num_classes,
    }
    save_checkpoint(session.out_dir / CHECKPOINT_NAME, checkpoint)


def check_resumable(checkpoint: dict, config: TrainConfig, world_size: int) -> None:
    """Refuse a resume whose settings cannot continue the saved run."""
    saved = checkpoint["config"]
    for name in RESUME_INVARIANTS:
        if saved.get(name) != getattr(config, name):
            raise UserError(
                f"cannot resume: --{name.replace('_', '-')} was {saved.get(name)} "
                f"in the checkpoint, now {getattr(config, name)}"
            )
    if checkpoint["world_size"] != world_size:
        raise UserError(
            f"cannot resume: the checkpoint was written by {checkpoint['world_size']} "
            f"processes, this run has {world_size}"
        )


def restore_session(session: TrainingSession, checkpoint: dict) -> None:
    """Put a checkpoint's state into ``session`` (same config and world size)."""
    context = session.context
    check_resumable(checkpoint, session.config, context.world_size)
    load_single_device_state(session.network, checkpoint["model"])
    session.optimizer.load_state_dict(checkpoint["optimizer"])
    session.schedule.load_state_dict(checkpoint["scheduler"])
    session.position = Position(
        checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]
    )
    session.saved_step = checkpoint["step"]
    saved_window = checkpoint["loss_window"]
    session.window = LossWindow(
        loss_sum=torch.tensor(saved_window["loss_sum"], dtype=torch.float64, device=session.device),
        steps=saved_window["steps"],
    )
    # Put the generators back at the point they were saved: before the next
    # epoch starts (an epoch-end checkpoint), or once the interrupted epoch is
    # running again (mid-epoch), since a loader may draw from them when an
    # epoch starts (torch's DataLoader seeds its workers so).
    rng_state = checkpoint["rng"][context.rank]
    if session.position.batch_in_epoch == 0:
        restore_rng_state(rng_state)
    else:
        session.pending_rng = rng_state
    saved_loader = checkpoint["loader"][context.rank]
    if saved_loader is not None and isinstance(session.train_loader, ResumableLoader):
        session.train_loader.load_state_dict(saved_loader)
    else:
        # The loader cannot seek: replay the epoch's order and drop what was done.
        session.skip_batches = session.position.batch_in_epoch
