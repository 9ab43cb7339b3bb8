"""The paper's AlexNet: size, LRN, initialization, shapes, and the two-column split."""

import pytest
import torch
from torch import nn

from trainer.columns import ColumnAlexNet, columns_to_single, single_to_columns
from trainer.model import (
    PAPER_PARAMETER_COUNT,
    AlexNet,
    LocalResponseNorm,
    count_parameters,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def paper_lrn_by_hand(activations: torch.Tensor) -> torch.Tensor:
    """b_i = a_i / (k + α Σ_{j=i-n/2}^{i+n/2} a_j²)^β with n=5, k=2, α=1e-4, β=0.75.

    The paper's formula, written out with explicit channel windows (float64).
    """
    n, k, alpha, beta = 5, 2.0, 1e-4, 0.75
    a = activations.double()
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        low, high = max(0, i - n // 2), min(channels - 1, i + n // 2)
        window = (a[:, low : high + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * window) ** beta
    return out


@pytest.fixture(scope="module")
def paper_network() -> AlexNet:
    """The full-size network (61M parameters), built once for the tests that read it."""
    torch.manual_seed(3)
    return AlexNet(num_classes=1000).eval()


def test_paper_network_has_60965224_parameters(paper_network):
    assert count_parameters(paper_network) == PAPER_PARAMETER_COUNT == 60_965_224
    assert count_parameters(ColumnAlexNet(num_classes=1000)) == PAPER_PARAMETER_COUNT


def test_layer_shapes_are_the_papers(paper_network):
    named = paper_network.named_parameters()
    shapes = {name: tuple(parameter.shape) for name, parameter in named}
    assert shapes["conv1.weight"] == (96, 3, 11, 11)
    assert shapes["conv2.weight"] == (256, 48, 5, 5)  # groups=2: each kernel sees one column
    assert shapes["conv3.weight"] == (384, 256, 3, 3)  # full: crosses the columns
    assert shapes["conv4.weight"] == (384, 192, 3, 3)
    assert shapes["conv5.weight"] == (256, 192, 3, 3)
    assert shapes["fc6.weight"] == (4096, 6 * 6 * 256)
    assert shapes["fc7.weight"] == (4096, 4096)
    assert shapes["fc8.weight"] == (1000, 4096)


def test_output_shape_and_spatial_sizes(paper_network):
    torch.manual_seed(0)
    network = paper_network
    images = torch.randn(2, 3, 224, 224) * 50
    with torch.no_grad():
        first = network.pool(network.norm1(network.relu(network.conv1(images))))
        logits = network(images)
        features = network.features(images)
    assert network.conv1(images).shape[-2:] == (55, 55)
    assert first.shape[-2:] == (27, 27)
    assert features.shape == (2, 9216)
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


def test_lrn_matches_the_papers_formula():
    torch.manual_seed(1)
    activations = torch.rand(2, 12, 5, 5) * 30  # post-ReLU magnitudes
    expected = paper_lrn_by_hand(activations)
    actual = LocalResponseNorm()(activations)
    assert actual.dtype == torch.float32
    assert torch.allclose(actual.double(), expected, rtol=1e-6, atol=1e-7)
    # The normalization actually acts at these magnitudes (not a near-identity check).
    assert (activations.double() / expected).min() > 1.5
    # torch's own LRN (α divided by n) computes the same function.
    torch_lrn = nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)
    assert torch.allclose(actual, torch_lrn(activations), rtol=1e-5, atol=1e-6)


def test_columnwise_lrn_never_mixes_the_columns():
    torch.manual_seed(2)
    activations = torch.rand(2, 12, 3, 3) * 30
    expected = torch.cat([paper_lrn_by_hand(half) for half in activations.chunk(2, dim=1)], 1)
    actual = LocalResponseNorm(columns=2)(activations)
    assert torch.allclose(actual.double(), expected, rtol=1e-6, atol=1e-7)
    # Channel 5 (last of column 0) differs from a window that crosses into column 1.
    crossing = paper_lrn_by_hand(activations)
    assert not torch.allclose(expected[:, 5], crossing[:, 5])
    # Channels-last input (--channels-last) gives the same values.
    channels_last = LocalResponseNorm(columns=2)(
        activations.contiguous(memory_format=torch.channels_last)
    )
    assert torch.equal(channels_last, actual)


def test_lrn_under_bf16_autocast_sums_in_float32():
    """bf16 in, bf16 out, but the window sum and the power are float32: the result is
    the float32 LRN of the bf16 values, rounded once."""
    torch.manual_seed(6)
    activations = (torch.rand(2, 12, 5, 5) * 30).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = LocalResponseNorm(columns=2)(activations)
    assert actual.dtype == torch.bfloat16
    expected = LocalResponseNorm(columns=2)(activations.float()).bfloat16()
    assert torch.equal(actual, expected)


def test_lrn_runs_no_avg_pool3d_forward_or_backward():
    """avg_pool3d (what nn.LocalResponseNorm runs) has a nondeterministic CUDA backward."""
    from torch.profiler import ProfilerActivity, profile

    network = AlexNet(num_classes=4, width=1 / 16)
    images = torch.randn(2, 3, 224, 224, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        network(images).sum().backward()
    operators = {event.key for event in profiler.key_averages()}
    assert "aten::convolution" in operators  # the profile saw the network run
    assert not [name for name in operators if "avg_pool" in name], sorted(operators)
    # ... whereas torch's LRN would have shown up.
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        nn.LocalResponseNorm(5)(torch.rand(1, 8, 3, 3))
    assert "aten::avg_pool3d" in {event.key for event in profiler.key_averages()}


def test_initialization_is_the_papers(paper_network):
    network = paper_network
    bias_one = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, module in network.named_children():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        weight = module.weight.detach()
        assert abs(weight.std().item() - 0.01) < 0.0005, name
        assert abs(weight.mean().item()) < 0.0005, name
        expected_bias = 1.0 if name in bias_one else 0.0
        assert torch.equal(module.bias.detach(), torch.full_like(module.bias, expected_bias)), name


def test_narrow_nets_keep_even_columns_and_scale_init():
    network = AlexNet(num_classes=5, width=1 / 16)
    assert network.conv1.out_channels % 2 == 0 and network.conv5.out_channels % 2 == 0
    assert abs(network.fc6.weight.std().item() - 0.04) < 0.002  # 0.01 / sqrt(1/16)


def test_weight_conversion_round_trips():
    single = AlexNet(num_classes=7, width=1 / 8).state_dict()
    back = columns_to_single(single_to_columns(single))
    assert back.keys() == single.keys()
    assert all(torch.equal(back[name], single[name]) for name in single)


def test_column_model_equals_single_model_with_converted_weights():
    torch.manual_seed(4)
    single = AlexNet(num_classes=7, width=1 / 4).eval()
    columns = ColumnAlexNet(num_classes=7, width=1 / 4).eval()
    columns.load_single_state_dict(single.state_dict())
    images = torch.randn(3, 3, 224, 224) * 50
    with torch.no_grad():
        expected, actual = single(images), columns(images)
    assert actual.shape == (3, 7)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert expected.std(dim=0).max() > 1e-3  # outputs depend on the input


def test_one_training_step_is_the_same_split_in_columns():
    torch.manual_seed(5)
    single = AlexNet(num_classes=5, width=1 / 16, dropout=0.0)
    columns = ColumnAlexNet(num_classes=5, width=1 / 16, dropout=0.0)
    columns.load_single_state_dict(single.state_dict())
    images, labels = torch.randn(2, 3, 224, 224) * 50, torch.tensor([1, 4])
    for network in (single, columns):
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        nn.functional.cross_entropy(network(images), labels).backward()
        optimizer.step()
    stepped = columns.single_state_dict()
    for name, tensor in single.state_dict().items():
        assert torch.allclose(stepped[name], tensor, rtol=1e-4, atol=1e-6), name
