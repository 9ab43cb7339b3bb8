"""Divergence: a run that can no longer learn stops, with one line that says why.

Three signs, judged when a metrics row is written and before every
checkpoint (so that a diverged state is never saved over the last good
one):

- the loss is not finite;
- the loss, after the first steps, went far above chance: over
  :data:`LOSS_LIMIT_FACTOR` × ln C, where a network that knows nothing
  scores ln C;
- the network is dying: one layer's units are silent (ReLU input ≤ 0) for
  every image of a batch, all of them or all but a few
  (:data:`DYING_FRACTION`), or the logits are the same for every image.
  A unit silent for a whole batch gets no gradient from it, so such a
  layer does not come back.

Measured on this project's case (README, "Real use"): full-width AlexNet,
8 classes of real photographs, batch 32, seeds 0-2. At the batch-128 rate
(0.01) the loss rises to 27-35 by step 3-5 (ln 8 = 2.08; the limit is 20.8),
then falls back to ln 8 while fc7's units die (10 % or fewer alive by step
12-13, the second sign) and the val error stays at chance. At the default
rate for that batch (0.0025) the loss overshoots too, but peaks at 12-16,
every layer keeps over 80 % of its units, and the run learns. Between the
two, the first sign to fire at 0.01 is the loss (step 4); the dying layer
would follow some ten steps later.

Cheap on the hot path: the loss is followed with one elementwise maximum
per step on the device, the activations are measured only on the steps
just before a check (a dying layer stays dead: one batch per check sees
it), and the values are read at the check, which reads the loss anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shards.errors import UserError
from trainer.distributed import DistributedContext, all_reduce_min

# Layers followed by a ReLU, and the logits layer (by the last part of their
# module names, so both AlexNet and each column of ColumnAlexNet match).
RELU_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
LOGITS_LAYER = "fc8"
FIRST_STEPS = 3  # steps whose loss level is not judged (a healthy start overshoots too)
LOSS_LIMIT_FACTOR = 10.0  # "far above chance": over 10 × ln C
DYING_FRACTION = 0.9  # a layer with at least this share of its units silent for a whole batch
CONSTANT_LOGITS = 1e-6  # logits' spread over the batch, relative to their size, below which
# they are the same for every image


class Divergence(UserError):
    """The run stopped because it can no longer learn (the message says why)."""


def _layer_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


class ActivationProbe:
    """Forward hooks that measure, on the training steps they are armed for, each
    ReLU layer's share of units active for at least one image of the batch, and
    the logits' spread over the batch.

    A unit is a channel of a conv layer (active if positive anywhere) or a
    neuron of a fully connected one. With ``--parallel columns`` each layer
    is split over two modules; its share is the mean of theirs (equal halves)
    and the logits' spread the largest of the two. Unarmed steps, evaluation
    (``eval()`` mode) and one-image batches are not measured.
    """

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        self.device = device
        self.armed = False
        self.alive: dict[str, list[torch.Tensor]] = {}
        self.spreads: list[torch.Tensor] = []
        for name, module in network.named_modules():
            layer = _layer_name(name)
            if layer in RELU_LAYERS or layer == LOGITS_LAYER:
                module.register_forward_hook(self._hook(layer))

    def _hook(self, layer: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not (self.armed and module.training) or output.shape[0] < 2:
                return
            output = output.detach()
            if layer == LOGITS_LAYER:
                spread = (output.amax(dim=0) - output.amin(dim=0)).amax().float()
                size = output.abs().amax().float() + 1.0
                self.spreads.append((spread / size).to(self.device, non_blocking=True))
                return
            # The layer's input to its ReLU: a unit is alive if positive for some image.
            dims = (0, 2, 3) if output.dim() == 4 else (0,)
            share = (output.amax(dim=dims) > 0).float().mean()
            self.alive.setdefault(layer, []).append(share.to(self.device, non_blocking=True))

        return record

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The last measured step's (alive share per RELU_LAYERS entry, logits' spread),
        Nones where nothing was measured; then disarm and forget them."""
        alive = spread = None
        if len(self.alive) == len(RELU_LAYERS):
            alive = torch.stack([torch.stack(self.alive[layer]).mean() for layer in RELU_LAYERS])
        if self.spreads:
            spread = torch.stack(self.spreads).amax()
        self.alive, self.spreads, self.armed = {}, [], False
        return alive, spread


class DivergenceGuard:
    """Watches a run's steps for the signs in this module's docstring.

    Every step adds one elementwise maximum on the device (the window's
    largest loss; a NaN carries through it). The probe's reductions run only
    on the steps the trainer arms it for, those just before a check (every
    ``log_every``-th step, and before checkpoints): a dying layer stays dead,
    so one batch per check is enough to see it.
    """

    def __init__(self, network: nn.Module, num_classes: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.chance_loss = math.log(max(num_classes, 2))
        self.loss_limit = LOSS_LIMIT_FACTOR * self.chance_loss
        self.probe = ActivationProbe(network, self.device)
        self.restart()

    def restart(self) -> None:
        """Forget the window (after its row was judged)."""
        self.max_loss = torch.zeros((), device=self.device)  # over steps past FIRST_STEPS
        self.early_not_finite = torch.zeros((), device=self.device)  # over the first steps
        self.min_spread = torch.full((), math.inf, device=self.device)
        self.min_alive = torch.ones(len(RELU_LAYERS), device=self.device)

    def arm(self) -> None:
        """Measure the activations of the next training step."""
        self.probe.armed = True

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """Take in a training step: its loss, and what the probe measured (no sync)."""
        loss = loss.detach().float().to(self.device)
        if step > FIRST_STEPS:
            torch.maximum(self.max_loss, loss, out=self.max_loss)
        else:  # the loss level is not judged yet, only whether it is a number
            self.early_not_finite = torch.maximum(
                self.early_not_finite, (~torch.isfinite(loss)).float()
            )
        if not self.probe.armed:
            return
        alive, spread = self.probe.take()
        if spread is not None:
            torch.minimum(self.min_spread, spread, out=self.min_spread)
        if alive is not None:
            torch.minimum(self.min_alive, alive, out=self.min_alive)

    def problem(self, context: DistributedContext) -> str | None:
        """What is wrong in the window so far, over all ranks, in words; None if nothing.

        A collective under DDP (every rank must call it at the same step); it
        reads the device's values, so it waits for the steps queued so far.
        """
        not_finite = torch.maximum(self.early_not_finite, (~torch.isfinite(self.max_loss)).float())
        # Larger-is-worse values negated: one elementwise minimum over the ranks keeps
        # the worst of every sign.
        worst = torch.cat(
            [
                torch.stack([-not_finite, -torch.nan_to_num(self.max_loss), self.min_spread]),
                self.min_alive,
            ]
        )
        all_reduce_min(worst, context)
        negated_not_finite, negated_max_loss, min_spread, *alive_shares = worst.tolist()
        if negated_not_finite < 0:
            return "the loss is not finite"
        for layer, alive in zip(RELU_LAYERS, alive_shares, strict=True):
            if alive <= 1.0 - DYING_FRACTION:
                return (
                    f"{layer} is dying: {1.0 - alive:.0%} of its units were silent for "
                    "every image of a batch"
                )
        if min_spread <= CONSTANT_LOGITS:
            return "the network is dead: its logits were the same for every image of a batch"
        if -negated_max_loss > self.loss_limit:
            return (
                f"the loss reached {-negated_max_loss:.3g}, over {LOSS_LIMIT_FACTOR:g}x chance "
                f"(ln C = {self.chance_loss:.3g})"
            )
        return None


def divergence_message(
    problem: str, step: int, loss: float, lr: float, suggested_lr: float, kept_step: int | None
) -> str:
    """The one line a diverged run ends with."""
    kept = (
        f"; checkpoint.pt (step {kept_step}) is the last good state"
        if kept_step is not None
        else ""
    )
    return (
        f"training stopped at step {step} (loss {loss:.4g}, lr {lr:g}): {problem}; "
        f"the network cannot learn from here. Start again with a lower --lr, "
        f"e.g. --lr {suggested_lr:g}{kept}"
    )
