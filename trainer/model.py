"""AlexNet as in Krizhevsky, Sutskever and Hinton (2012), on one device.

The two GPU "columns" of the paper appear here as grouped convolutions
(``groups=2``) for conv2, conv4 and conv5, and as local response
normalization applied to each column's maps separately (each GPU normalized
only the maps it held). conv3 and the fully connected layers see both
columns. The same network split over two devices is :mod:`trainer.columns`;
both hold exactly the same parameters.

Input is 3×224×224 with padding 2 in conv1 (the "224 vs 227" quirk), which
gives the 55→27→13→6 spatial sizes of the paper and a 6×6×256 input to fc6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as functional
from torch import nn

# The paper's network with 1000 classes; asserted by the tests.
PAPER_PARAMETER_COUNT = 60_965_224

# Kernels per layer of the paper's network (both columns together).
CONV_CHANNELS = (96, 256, 384, 384, 256)
HIDDEN_UNITS = 4096
# Layers whose biases start at 1 (so their ReLUs start with positive input);
# every other bias starts at 0.
LAYERS_WITH_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
INIT_STD = 0.01
NUM_COLUMNS = 2


class LocalResponseNorm(nn.Module):
    """The paper's LRN, b_i = a_i / (k + α Σ_j a_j²)^β with j over the n maps around i.

    n=5, k=2, α=1e-4, β=0.75, the sum clipped at the first and last map.
    With ``columns`` > 1 the maps are split into that many equal groups and
    the window never crosses from one group into the next (each GPU could
    normalize only the maps it held).

    Written out as a sum of n shifted channel slices rather than with
    ``nn.LocalResponseNorm``: that one runs ``avg_pool3d``, whose CUDA
    backward is nondeterministic, and folds α/n into an average. The sum
    is computed in float32 (also under bf16 autocast, where the squares
    would otherwise lose their low bits); the output has the input's dtype.
    """

    def __init__(
        self,
        columns: int = 1,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 2.0,
    ) -> None:
        super().__init__()
        self.columns, self.size, self.alpha, self.beta, self.k = columns, size, alpha, beta, k

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = activations.shape
        per_column = channels // self.columns
        values = activations.float()
        squares = (values * values).reshape(batch, self.columns, per_column, height, width)
        half = self.size // 2
        # Zero maps on both sides of each column make every window n maps long.
        padded = functional.pad(squares, (0, 0, 0, 0, half, half))
        window = padded[:, :, :per_column]
        for shift in range(1, self.size):
            window = window + padded[:, :, shift : shift + per_column]
        window = window.reshape(batch, channels, height, width)
        denominator = (window * self.alpha + self.k).pow(self.beta)
        return (values / denominator).to(activations.dtype)

    def extra_repr(self) -> str:
        return (
            f"columns={self.columns}, size={self.size}, alpha={self.alpha}, "
            f"beta={self.beta}, k={self.k}"
        )


def scaled_widths(width: float) -> tuple[tuple[int, ...], int]:
    """Conv channel counts and hidden units for a width multiplier (1.0 = the paper).

    Widths below 1 exist only to make CPU tests and demos fast; every count
    stays even so that both columns get the same number of kernels.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")

    def even(count: int) -> int:
        return max(NUM_COLUMNS, NUM_COLUMNS * round(count * width / NUM_COLUMNS))

    return tuple(even(count) for count in CONV_CHANNELS), even(HIDDEN_UNITS)


class AlexNet(nn.Module):
    """The paper's AlexNet: 5 conv layers (2 columns), 3 fully connected layers.

    ``num_classes`` sets fc8; ``dropout`` is the drop probability of fc6 and
    fc7 (0.5 in the paper); ``width`` scales every layer (1.0 = the paper).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, width: float = 1.0) -> None:
        super().__init__()
        (c1, c2, c3, c4, c5), hidden = scaled_widths(width)
        self.num_classes = num_classes
        self.width = width
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=NUM_COLUMNS)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=NUM_COLUMNS)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=NUM_COLUMNS)
        self.fc6 = nn.Linear(c5 * 6 * 6, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)
        self.norm1 = LocalResponseNorm(columns=NUM_COLUMNS)
        self.norm2 = LocalResponseNorm(columns=NUM_COLUMNS)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        initialize_paper(self, width)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Conv layers: N×3×224×224 images to N×(256·6·6) features."""
        x = self.pool(self.norm1(self.relu(self.conv1(images))))
        x = self.pool(self.norm2(self.relu(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.pool(self.relu(self.conv5(x)))
        return torch.flatten(x, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (the softmax is left to the loss)."""
        x = self.features(images)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)


def init_std(width: float = 1.0) -> float:
    """0.01, the paper's weight std, for the paper's width.

    A narrower net has proportionally fewer inputs per unit; scaling the std
    by 1/sqrt(width) keeps every layer's output variance what it is in the
    full net, so that its signal is not drowned by the biases of 1.
    """
    return INIT_STD / math.sqrt(width)


def initialize_paper(model: nn.Module, width: float = 1.0) -> None:
    """Weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.

    Works on any module whose conv/linear children are named like the
    paper's layers (the single-device net and each column). ``width`` < 1
    (test and demo nets only) scales the std, see :func:`init_std`.
    """
    std = init_std(width)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            layer = name.rsplit(".", 1)[-1]
            nn.init.constant_(module.bias, 1.0 if layer in LAYERS_WITH_BIAS_ONE else 0.0)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(parameter.numel() for parameter in model.parameters())
