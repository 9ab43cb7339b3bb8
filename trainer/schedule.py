"""Learning-rate schedules, stepped once per epoch after evaluation.

The paper divided the learning rate by 10 "when the validation error rate
stopped improving", three times in all: :class:`PlateauSchedule`.
:class:`StepSchedule` is the fixed alternative (÷10 every N epochs). Both
keep their whole state in a plain dict for checkpoints.
"""

from __future__ import annotations

import math

import torch

FACTOR = 0.1


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class PlateauSchedule:
    """÷10 after ``patience`` epochs without a top-1 error drop of ``threshold``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        patience: int = 3,
        threshold: float = 1e-3,
        max_reductions: int = 3,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.patience = patience
        self.threshold = threshold
        self.max_reductions = max_reductions
        self.best_error = math.inf
        self.epochs_without_improvement = 0
        self.reductions = 0

    @property
    def lr(self) -> float:
        return self.base_lr * FACTOR**self.reductions

    def epoch_end(self, epochs_done: int, top1_err: float | None) -> None:
        """Record an epoch's validation error; reduce the rate if it stalled."""
        if top1_err is None:  # no validation split: keep the rate
            return
        if top1_err < self.best_error - self.threshold:
            self.best_error = top1_err
            self.epochs_without_improvement = 0
            return
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= self.patience:
            if self.reductions < self.max_reductions:
                self.reductions += 1
                _set_lr(self.optimizer, self.lr)
            self.epochs_without_improvement = 0

    def state_dict(self) -> dict:
        return {
            "kind": "plateau",
            "best_error": self.best_error,
            "epochs_without_improvement": self.epochs_without_improvement,
            "reductions": self.reductions,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_error = state["best_error"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.reductions = state["reductions"]
        _set_lr(self.optimizer, self.lr)


class StepSchedule:
    """÷10 every ``step_epochs`` epochs, at most ``max_reductions`` times."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        step_epochs: int = 30,
        max_reductions: int = 3,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.step_epochs = step_epochs
        self.max_reductions = max_reductions
        self.reductions = 0

    @property
    def lr(self) -> float:
        return self.base_lr * FACTOR**self.reductions

    def epoch_end(self, epochs_done: int, top1_err: float | None) -> None:
        """Set the rate for the epoch after ``epochs_done`` completed epochs."""
        self.reductions = min(epochs_done // self.step_epochs, self.max_reductions)
        _set_lr(self.optimizer, self.lr)

    def state_dict(self) -> dict:
        return {"kind": "step", "reductions": self.reductions}

    def load_state_dict(self, state: dict) -> None:
        self.reductions = state["reductions"]
        _set_lr(self.optimizer, self.lr)


def create_schedule(config, optimizer: torch.optim.Optimizer) -> PlateauSchedule | StepSchedule:
    """The schedule named by ``config.schedule`` (a :class:`TrainConfig`)."""
    if config.schedule == "step":
        return StepSchedule(optimizer, config.lr, config.step_epochs, config.max_lr_reductions)
    return PlateauSchedule(
        optimizer,
        config.lr,
        config.plateau_patience,
        config.plateau_threshold,
        config.max_lr_reductions,
    )
