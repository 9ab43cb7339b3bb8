"""Learning-rate schedules: torch's own, stepped once per epoch after evaluation.

The paper divided the learning rate by 10 "when the validation error rate
stopped improving", three times in all: ``ReduceLROnPlateau`` on the top-1
error. ``--schedule step`` is the fixed alternative, ÷10 every N epochs:
``MultiStepLR``. Their ``state_dict()`` goes into the checkpoint as it is.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR, ReduceLROnPlateau

FACTOR = 0.1

Schedule = LRScheduler  # ReduceLROnPlateau is one too (torch >= 2.2)


def create_schedule(config, optimizer: torch.optim.Optimizer) -> Schedule:
    """The schedule named by ``config.schedule`` (a :class:`TrainConfig`), starting at
    ``config.lr`` (the optimizer's rate)."""
    reductions = config.max_lr_reductions
    if config.schedule == "step":
        milestones = [config.step_epochs * count for count in range(1, reductions + 1)]
        return MultiStepLR(optimizer, milestones=milestones, gamma=FACTOR)
    # At most `reductions` divisions: the floor is lr / 10**reductions. A division
    # that would go below it is clamped to it, and one from the floor itself is
    # then a change far below eps (1 % of the floor), which torch ignores; every
    # real division changes the rate by 90 %, far above it. So float noise in
    # lr * 0.1 * 0.1 * 0.1 neither blocks the last division nor adds a fourth.
    floor = config.lr * FACTOR**reductions
    return ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=FACTOR,
        # torch divides once more than `patience` epochs went without improvement;
        # plateau_patience counts the epochs that trigger the division.
        patience=config.plateau_patience - 1,
        threshold=config.plateau_threshold,
        threshold_mode="abs",  # improvement: an error below best - threshold
        min_lr=floor,
        eps=floor * 0.01,
    )


def end_epoch(schedule: Schedule, top1_err: float | None) -> None:
    """Step the schedule after an epoch, with its val top-1 error (None: no val split,
    which leaves a plateau schedule's rate as it is)."""
    if isinstance(schedule, ReduceLROnPlateau):
        if top1_err is not None:
            schedule.step(top1_err)
        return
    schedule.step()
