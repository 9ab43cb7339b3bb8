"""The paper's model parallelism: AlexNet as two columns on two devices.

Each column holds half of the kernels of every layer (and half of fc8's
classes). The columns exchange activations only where the paper says they
do: at the input of conv3 and of each fully connected layer. Everything else
(conv1, conv2, conv4, conv5, their LRN and pooling) stays on the column's
own device. On a CPU-only machine both columns live on the CPU, which
computes exactly what the two-GPU layout computes.

Every parameter of the single-device :class:`trainer.model.AlexNet` splits
into the two columns' parameters along its first (output) dimension, which
is what :func:`single_to_columns` and :func:`columns_to_single` do.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.model import NUM_COLUMNS, LocalResponseNorm, initialize_paper, scaled_widths

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def class_split(num_classes: int) -> tuple[int, int]:
    """fc8 outputs of each column (the first takes the odd one out)."""
    first = (num_classes + 1) // 2
    return first, num_classes - first


class Column(nn.Module):
    """One column: half of each layer's kernels, on one device."""

    def __init__(self, classes: int, dropout: float, width: float) -> None:
        super().__init__()
        (c1, c2, c3, c4, c5), hidden = scaled_widths(width)
        half = NUM_COLUMNS
        self.conv1 = nn.Conv2d(3, c1 // half, kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(c1 // half, c2 // half, kernel_size=5, padding=2)
        # conv3 and the fc layers take input from both columns.
        self.conv3 = nn.Conv2d(c2, c3 // half, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(c3 // half, c4 // half, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(c4 // half, c5 // half, kernel_size=3, padding=1)
        self.fc6 = nn.Linear(c5 * 6 * 6, hidden // half)
        self.fc7 = nn.Linear(hidden, hidden // half)
        self.fc8 = nn.Linear(hidden, classes)
        self.norm1 = LocalResponseNorm()
        self.norm2 = LocalResponseNorm()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

    def lower(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 and conv2, each with ReLU, LRN and pooling; column-local."""
        x = self.pool(self.norm1(self.relu(self.conv1(images))))
        return self.pool(self.norm2(self.relu(self.conv2(x))))

    def upper(self, both_columns: torch.Tensor) -> torch.Tensor:
        """conv3 (input: both columns) then the column-local conv4, conv5 and pool."""
        x = self.relu(self.conv3(both_columns))
        x = self.relu(self.conv4(x))
        return torch.flatten(self.pool(self.relu(self.conv5(x))), 1)

    def hidden6(self, both_columns: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.relu(self.fc6(both_columns)))

    def hidden7(self, both_columns: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.relu(self.fc7(both_columns)))


class ColumnAlexNet(nn.Module):
    """AlexNet split over ``devices`` (two of them, possibly the same one).

    Takes images on any device and returns logits on the first device.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.5,
        width: float = 1.0,
        devices: tuple[torch.device | str, torch.device | str] = ("cpu", "cpu"),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.devices = tuple(torch.device(device) for device in devices)
        self.columns = nn.ModuleList(
            Column(classes, dropout, width) for classes in class_split(num_classes)
        )
        for column, device in zip(self.columns, self.devices, strict=True):
            initialize_paper(column, width)
            column.to(device)

    def _exchange(self, halves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each device gets both halves, concatenated in column order."""
        return [
            torch.cat([half.to(device, non_blocking=True) for half in halves], dim=1)
            for device in self.devices
        ]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, on the first column's device."""
        # Each column's work is queued on its own device, so on two GPUs the
        # columns run concurrently between the exchanges.
        pairs = list(zip(self.columns, self.devices, strict=True))
        halves = [column.lower(images.to(device, non_blocking=True)) for column, device in pairs]
        both = self._exchange(halves)
        halves = [column.upper(x) for (column, _), x in zip(pairs, both, strict=True)]
        both = self._exchange(halves)
        halves = [column.hidden6(x) for (column, _), x in zip(pairs, both, strict=True)]
        both = self._exchange(halves)
        halves = [column.hidden7(x) for (column, _), x in zip(pairs, both, strict=True)]
        both = self._exchange(halves)
        logits = [column.fc8(x) for (column, _), x in zip(pairs, both, strict=True)]
        return torch.cat([part.to(self.devices[0]) for part in logits], dim=1)

    def single_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as a single-device :class:`AlexNet` state dict (on the CPU)."""
        return columns_to_single(self.state_dict())

    def load_single_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved from a single-device :class:`AlexNet`."""
        self.load_state_dict(single_to_columns(state))


def single_to_columns(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split an AlexNet state dict into a ColumnAlexNet state dict.

    Grouped layers already keep each column's kernels in the first or second
    half of their output channels; conv3 and the fc layers' output units are
    split the same way, so every tensor splits along dimension 0.
    """
    columns: dict[str, torch.Tensor] = {}
    for layer in LAYERS:
        for kind in ("weight", "bias"):
            tensor = state[f"{layer}.{kind}"]
            sizes = class_split(tensor.shape[0])
            for index, part in enumerate(torch.split(tensor, list(sizes))):
                columns[f"columns.{index}.{layer}.{kind}"] = part.clone()
    return columns


def columns_to_single(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Join a ColumnAlexNet state dict into an AlexNet state dict (tensors on the CPU)."""
    single: dict[str, torch.Tensor] = {}
    for layer in LAYERS:
        for kind in ("weight", "bias"):
            parts = [state[f"columns.{index}.{layer}.{kind}"].cpu() for index in range(NUM_COLUMNS)]
            single[f"{layer}.{kind}"] = torch.cat(parts, dim=0)
    return single
