"""Divergence: a run that can no longer learn stops, with one line that says why.

Three signs, watched on every training step and judged when a metrics row
is written (and before every checkpoint, so that a diverged state is never
saved over the last good one):

- the loss is not finite;
- the loss, after the first steps, went far above chance: over
  :data:`LOSS_LIMIT_FACTOR` × ln C, where a network that knows nothing
  scores ln C;
- the network is dying: one layer's units are silent (ReLU input ≤ 0) for
  every image of a batch, all of them or all but a few
  (:data:`DYING_FRACTION`), or the logits are the same for every image.
  A unit silent for a whole batch gets no gradient from it, so such a
  layer does not come back.

Measured on this project's case (README, "Training"): full-width AlexNet,
8 classes of real photographs, batch 32, seeds 0-2. At the batch-128 rate
(0.01) the loss rises to 27-35 by step 3-5 (ln 8 = 2.08; the limit is 20.8),
then falls back to ln 8 while fc7's units die (10 % or fewer alive by step
12-13, the second sign) and the val error stays at chance. At the default
rate for that batch (0.0025) the loss overshoots too, but peaks at 12-16,
every layer keeps over 80 % of its units, and the run learns.

The per-step work stays on the device (a few reductions, no sync); the
values are read when a row is written, which reads the loss anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shards.errors import UserError
from trainer.distributed import DistributedContext

# Layers followed by a ReLU, and the logits layer (by the last part of their
# module names, so both AlexNet and each column of ColumnAlexNet match).
RELU_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
LOGITS_LAYER = "fc8"
FIRST_STEPS = 3  # steps whose loss level is not judged (a healthy start overshoots too)
LOSS_LIMIT_FACTOR = 10.0  # "far above chance": over 10 × ln C
DYING_FRACTION = 0.9  # a layer with at least this share of its units silent for a whole batch
CONSTANT_LOGITS = 1e-6  # logits' spread over the batch, relative to their size, below which
# they are the same for every image

# Positions in the window's summary vector (see DivergenceGuard.observe). Larger-is-worse
# values are stored negated, so that one elementwise minimum (over steps, and over
# ranks) keeps the worst of every sign.
_NOT_FINITE, _MAX_LOSS, _LOGIT_SPREAD, _FIRST_LAYER = 0, 1, 2, 3


class Divergence(UserError):
    """The run stopped because it can no longer learn (the message says why)."""


def _layer_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


class ActivationProbe:
    """Forward hooks that measure, per training step, each ReLU layer's share of
    units active for at least one image of the batch, and the logits' spread.

    A unit is a channel of a conv layer (active if positive anywhere) or a
    neuron of a fully connected one. With ``--parallel columns`` each layer
    is split over two modules; its share is the mean of theirs (equal halves)
    and the logits' spread the largest of the two. Evaluation (``eval()``
    mode) and one-image batches are not measured.
    """

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        self.device = device
        self.alive: dict[str, list[torch.Tensor]] = {}
        self.spreads: list[torch.Tensor] = []
        self.handles = []
        for name, module in network.named_modules():
            layer = _layer_name(name)
            if layer in RELU_LAYERS or layer == LOGITS_LAYER:
                self.handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not module.training or output.shape[0] < 2:
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
        """This step's (alive share per RELU_LAYERS entry, logits' spread), or Nones
        when the step was not measured; then forget them."""
        alive = spread = None
        if len(self.alive) == len(RELU_LAYERS):
            alive = torch.stack([torch.stack(self.alive[layer]).mean() for layer in RELU_LAYERS])
        if self.spreads:
            spread = torch.stack(self.spreads).amax()
        self.alive, self.spreads = {}, []
        return alive, spread

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class DivergenceGuard:
    """Watches a run's steps for the signs in this module's docstring."""

    def __init__(self, network: nn.Module, num_classes: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.chance_loss = math.log(max(num_classes, 2))
        self.loss_limit = LOSS_LIMIT_FACTOR * self.chance_loss
        self.probe = ActivationProbe(network, self.device)
        self.neutral = torch.tensor(
            [0.0, 0.0, math.inf] + [1.0] * len(RELU_LAYERS), device=self.device
        )
        self.restart()

    def restart(self) -> None:
        """Forget the window (after its row was judged)."""
        self.worst = self.neutral.clone()

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """Take in a training step: its loss, and what the probe measured (no sync)."""
        loss = loss.detach().float().to(self.device)
        values = self.neutral.clone()
        values[_NOT_FINITE] = -(~torch.isfinite(loss)).float()
        if step > FIRST_STEPS:
            values[_MAX_LOSS] = -loss
        alive, spread = self.probe.take()
        if spread is not None:
            values[_LOGIT_SPREAD] = spread
        if alive is not None:
            values[_FIRST_LAYER:] = alive
        torch.minimum(self.worst, values, out=self.worst)

    def problem(self, context: DistributedContext) -> str | None:
        """What is wrong in the window so far, over all ranks, in words; None if nothing.

        A collective under DDP (every rank must call it at the same step); it
        reads the device's values, so it waits for the steps queued so far.
        """
        worst = self.worst.clone()
        if context.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(worst, op=dist.ReduceOp.MIN)
        values = worst.tolist()
        if values[_NOT_FINITE] < 0:
            return "the loss is not finite"
        for layer, alive in zip(RELU_LAYERS, values[_FIRST_LAYER:], strict=True):
            if alive <= 1.0 - DYING_FRACTION:
                return (
                    f"{layer} is dying: {1.0 - alive:.0%} of its units were silent for "
                    "every image of a batch"
                )
        if values[_LOGIT_SPREAD] <= CONSTANT_LOGITS:
            return "the network is dead: its logits were the same for every image of a batch"
        max_loss = -values[_MAX_LOSS]
        if max_loss > self.loss_limit:
            return (
                f"the loss reached {max_loss:.3g}, over {LOSS_LIMIT_FACTOR:g}x chance "
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
