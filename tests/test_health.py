"""The divergence guard: each sign on a real (narrow) AlexNet, the verdict across ranks,
and a run stopped by it (one line, the last good checkpoint kept)."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import SyntheticData, small_config, train_losses

from shards.errors import UserError
from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from trainer.columns import ColumnAlexNet
from trainer.distributed import DistributedContext, run_distributed
from trainer.health import FIRST_STEPS, Divergence, DivergenceGuard
from trainer.model import AlexNet
from trainer.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CLASSES = 4
SINGLE = DistributedContext()


def _network(kind: str = "single") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "columns":
        return ColumnAlexNet(NUM_CLASSES, width=1 / 16)
    return AlexNet(NUM_CLASSES, width=1 / 16)


def _step(
    network,
    guard: DivergenceGuard,
    step: int,
    images: int = 4,
    loss: float | None = None,
    armed: bool = True,
):
    """One forward pass in training mode, then what the trainer hands the guard."""
    if armed:
        guard.arm()
    network.train()
    with torch.no_grad():
        logits = network(torch.randn(images, 3, 224, 224) * 50)
    value = torch.tensor(loss) if loss is not None else logits.logsumexp(1).mean()
    guard.observe(step, value)


@pytest.mark.parametrize("kind", ["single", "columns"])
def test_a_healthy_network_passes(kind):
    network = _network(kind)
    guard = DivergenceGuard(network, NUM_CLASSES, "cpu")
    for step in range(1, 6):
        _step(network, guard, step)
    assert guard.problem(SINGLE) is None


@pytest.mark.parametrize("kind", ["single", "columns"])
def test_a_silent_layer_is_a_dying_network(kind):
    network = _network(kind)
    layers = [network] if kind == "single" else list(network.columns)
    for layer in layers:
        torch.nn.init.constant_(layer.conv4.bias, -1e4)  # every unit's input below 0
    guard = DivergenceGuard(network, NUM_CLASSES, "cpu")
    _step(network, guard, 1)
    assert guard.problem(SINGLE) == (
        "conv4 is dying: 100% of its units were silent for every image of a batch"
    )
    # One column silent is half the layer: not a dying network.
    if kind == "columns":
        torch.nn.init.constant_(network.columns[1].conv4.bias, 1.0)
        guard.restart()
        _step(network, guard, 2)
        assert guard.problem(SINGLE) is None


def test_constant_logits_are_a_dead_network():
    network = _network()
    torch.nn.init.zeros_(network.fc8.weight)  # the logits are fc8's bias, whatever the image
    guard = DivergenceGuard(network, NUM_CLASSES, "cpu")
    _step(network, guard, 1)
    assert "logits were the same for every image" in guard.problem(SINGLE)


def test_batches_of_one_unarmed_steps_and_evaluation_are_not_judged():
    network = _network()
    torch.nn.init.zeros_(network.fc8.weight)
    guard = DivergenceGuard(network, NUM_CLASSES, "cpu")
    _step(network, guard, 1, images=1)  # one image: its logits are trivially "constant"
    _step(network, guard, 2, armed=False)  # the trainer arms only the steps before a check
    guard.arm()
    network.eval()
    with torch.no_grad():
        network(torch.randn(4, 3, 224, 224))
    guard.observe(3, torch.tensor(1.0))
    assert guard.problem(SINGLE) is None
    _step(network, guard, 4)  # armed, training, 4 images: seen
    assert "logits were the same" in guard.problem(SINGLE)


def test_loss_signs():
    network = _network()
    guard = DivergenceGuard(network, NUM_CLASSES, "cpu")
    limit = 10 * math.log(NUM_CLASSES)
    # The first steps may overshoot: not judged.
    for step in range(1, FIRST_STEPS + 1):
        _step(network, guard, step, loss=100.0)
    assert guard.problem(SINGLE) is None
    _step(network, guard, FIRST_STEPS + 1, loss=limit * 0.99)
    assert guard.problem(SINGLE) is None
    _step(network, guard, FIRST_STEPS + 2, loss=limit * 1.5)
    assert guard.problem(SINGLE).startswith(f"the loss reached {limit * 1.5:.3g}, over 10x chance")
    # A non-finite loss, at any step, comes first.
    guard.restart()
    _step(network, guard, 1, loss=math.nan)
    assert guard.problem(SINGLE) == "the loss is not finite"
    guard.restart()
    assert guard.problem(SINGLE) is None


def _verdicts(context: DistributedContext, out_path: str) -> None:
    """Rank 1 alone sees a non-finite loss; both ranks must reach the same verdict."""
    network = _network()
    guard = DivergenceGuard(network, NUM_CLASSES, "cpu")
    _step(network, guard, 5, loss=math.nan if context.rank == 1 else 1.0)
    with open(f"{out_path}-{context.rank}", "w", encoding="utf-8") as handle:
        handle.write(str(guard.problem(context)))


def test_every_rank_reaches_the_same_verdict(tmp_path):
    run_distributed(_verdicts, 2, "cpu", str(tmp_path / "verdict"))
    verdicts = [(tmp_path / f"verdict-{rank}").read_text() for rank in (0, 1)]
    assert verdicts == ["the loss is not finite"] * 2


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_good_checkpoint(tmp_path, nproc):
    run_dir = tmp_path / "run"
    # A rate 1000x too high blows the narrow net up within a few steps.
    config = small_config(run_dir, lr=10.0, nproc=nproc, checkpoint_every=1, log_every=5)
    with pytest.raises(UserError) as stop:
        train(config, make_loaders=SyntheticData())
    message = str(stop.value)
    assert "\n" not in message
    if nproc == 1:
        assert isinstance(stop.value, Divergence)
    assert message.startswith("training stopped at step ")
    stopped_at = int(message.split()[4])
    assert stopped_at <= 6  # within the first epoch
    assert "lr 10)" in message and "--lr 0.000625" in message  # the default for batch 8
    # metrics.jsonl ends at the step the message names, with the loss it names.
    [(last_step, last_loss)] = train_losses(run_dir)[-1:]
    assert last_step == stopped_at and f"(loss {last_loss:.4g}, lr 10)" in message
    # Checks ran before every checkpoint: the last one is the step before the stop.
    kept = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert kept["step"] == stopped_at - 1
    assert f"checkpoint.pt (step {stopped_at - 1}) is the last good state" in message
    assert all(torch.isfinite(tensor).all() for tensor in kept["model"].values())
