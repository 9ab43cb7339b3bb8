"""The training loop on synthetic data: learning, metrics, evaluation, checkpoints, resume.

The data come from :class:`SyntheticLoader`, a small deterministic
in-memory loader with the protocol the trainer expects of the real one
(each ``iter()`` is the next epoch, a seeded order per epoch, ``len()``,
and its position via ``state_dict``/``load_state_dict``).
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from shards.errors import UserError
from trainer.checkpoint import CHECKPOINT_NAME, FORMAT, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.engine import evaluate, measure_batches
from trainer.evaluation import evaluate_checkpoint
from trainer.metrics import read_rows
from trainer.model import AlexNet
from trainer.run import train
from trainer.schedule import create_schedule, end_epoch
from trainer.session import check_resumable

TESTS_DIR = Path(__file__).resolve().parent
NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=256)
def _noise_image(seed: int) -> torch.Tensor:
    """Per-sample noise, generated once per test process."""
    return torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(seed))


class ReplayLoader:
    """Deterministic image-classification batches, like the real loader but in memory.

    Class ``c`` is a fixed random colour pattern (4×4 blocks over 224×224)
    scaled by ``amplitude``, plus per-sample Gaussian noise; sample ``i``
    has label ``i % num_classes`` and always the same pixels. Each
    ``iter()`` is the next epoch (or the one given to ``set_epoch``); the
    order is a permutation seeded by (seed, epoch), dealt out over ranks.
    Starting an epoch consumes one draw of torch's global generator.
    This class cannot report its position: the trainer must replay.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_classes: int = NUM_CLASSES,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        sample_offset: int = 0,
        delay: float = 0.0,
        amplitude: float = 60.0,
        noise: float = 20.0,
    ) -> None:
        self.num_samples, self.batch_size, self.num_classes = num_samples, batch_size, num_classes
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.sample_offset, self.delay = shuffle, sample_offset, delay
        self.amplitude, self.noise = amplitude, noise
        coarse = torch.randn(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(99))
        self.templates = nn.functional.interpolate(coarse, size=(224, 224), mode="nearest")
        self.epoch = -1
        self.batches_consumed = 0
        self.next_epoch: int | None = None

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def sample(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        noise = _noise_image(10_000 + self.sample_offset + index)
        return self.amplitude * self.templates[label] + self.noise * noise, label

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))[self.rank :: self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)[self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __iter__(self):
        epoch = self.epoch + 1 if self.next_epoch is None else self.next_epoch
        self.next_epoch = None
        return self._start(epoch, 0)

    def _start(self, epoch: int, first_batch: int):
        self.epoch, self.batches_consumed = epoch, first_batch
        return self._batches(epoch, first_batch)

    def _batches(self, epoch: int, first_batch: int):
        # Like torch's DataLoader, which draws its workers' base seed from the
        # global generator when an epoch starts: the trainer must cope.
        torch.empty((), dtype=torch.int64).random_()
        order = self.order(epoch)
        for batch in range(first_batch, len(self)):
            indices = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            samples = [self.sample(int(index)) for index in indices]
            if self.delay:
                time.sleep(self.delay)
            self.batches_consumed = batch + 1
            images = torch.stack([image for image, _ in samples])
            yield images, torch.tensor([label for _, label in samples], dtype=torch.int64)


class SyntheticLoader(ReplayLoader):
    """A :class:`ReplayLoader` that also saves and restores its position."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = (state["epoch"], state["batches_consumed"])

    def __iter__(self):
        if self.resume_at is None:
            return super().__iter__()
        (epoch, first_batch), self.resume_at = self.resume_at, None
        if first_batch >= len(self):  # saved at the end of an epoch
            epoch, first_batch = epoch + 1, 0
        return self._start(epoch, first_batch)


class SyntheticData:
    """``make_loaders`` for the trainer: (train, val) synthetic loaders of a rank."""

    def __init__(self, train_samples=48, val_samples=16, resumable=True, delay=0.0) -> None:
        self.train_samples, self.val_samples = train_samples, val_samples
        self.resumable, self.delay = resumable, delay

    def __call__(self, config: TrainConfig, rank: int, world_size: int):
        loader_class = SyntheticLoader if self.resumable else ReplayLoader
        batch_size = config.batch_size // world_size
        shared = {"num_classes": config.num_classes, "rank": rank, "world_size": world_size}
        train_loader = loader_class(
            self.train_samples, batch_size, seed=config.seed, delay=self.delay, **shared
        )
        val_loader = ReplayLoader(
            self.val_samples, batch_size, shuffle=False, sample_offset=50_000, **shared
        )
        return train_loader, val_loader


def small_config(run_dir: Path, **changes) -> TrainConfig:
    """A seconds-long CPU run: 4 classes, 6 steps per epoch, a 1/16-width network."""
    config = TrainConfig(
        shards_dir=str(run_dir.parent / "unused-shards"),
        out_dir=str(run_dir),
        epochs=2,
        batch_size=8,
        lr=0.01,
        device="cpu",
        backend="torch",
        num_classes=NUM_CLASSES,
        width=1 / 16,
        log_every=1,
        progress=False,
    )
    return config.replace(**changes)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (row["step"], row["loss"]) for row in read_rows(run_dir / "metrics.jsonl") if "loss" in row
    ]


def eval_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_rows(run_dir / "metrics.jsonl") if "top1_err" in row]


# --- a short run learns, and writes the run directory ----------------------------------------


def test_short_run_drives_the_loss_down_and_beats_chance(tmp_path):
    run_dir = tmp_path / "run"
    data = SyntheticData(train_samples=64, val_samples=32)
    config = train(small_config(run_dir, dropout=0.0, epochs=3), make_loaders=data)

    losses = [loss for _, loss in train_losses(run_dir)]
    assert len(losses) == 24  # 3 epochs × 8 steps, one row per step
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    evaluations = eval_rows(run_dir)
    assert [row["epoch"] for row in evaluations] == [1, 2, 3]
    assert [row["step"] for row in evaluations] == [8, 16, 24]
    assert evaluations[-1]["top1_err"] < 0.5  # chance is 0.75
    assert evaluations[-1]["top5_err"] == 0.0  # 4 classes: top-5 always hits

    rows = read_rows(run_dir / "metrics.jsonl")
    first = rows[0]
    assert set(first) >= {"epoch", "step", "loss", "lr", "img_per_s", "data_wait_frac"}
    assert first["epoch"] == 1 and first["step"] == 1 and first["lr"] == 0.01
    assert first["img_per_s"] > 0 and 0 <= first["data_wait_frac"] <= 1

    record = json.loads((run_dir / "config.json").read_text())
    assert record["world_size"] == 1 and record["per_process_batch_size"] == 8
    assert record["num_classes"] == NUM_CLASSES and record["momentum"] == 0.9
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert (checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]) == (3, 0, 24)
    assert config.num_classes == NUM_CLASSES

    # The checkpoint evaluates to the error the run logged for its last epoch.
    _, val_loader = data(config, 0, 1)
    results = evaluate_checkpoint(
        "unused", run_dir / CHECKPOINT_NAME, device="cpu", loader=val_loader
    )
    assert results["num_images"] == 32
    assert results["top1_err"] == pytest.approx(evaluations[-1]["top1_err"])
    assert results["val_loss"] == pytest.approx(evaluations[-1]["val_loss"], rel=1e-5)


def test_column_parallel_run_saves_single_device_weights(tmp_path):
    run_dir = tmp_path / "run"
    data = SyntheticData(train_samples=32)
    train(small_config(run_dir, parallel="columns", epochs=1), make_loaders=data)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    network = AlexNet(NUM_CLASSES, width=1 / 16)
    network.load_state_dict(checkpoint["model"])  # the single-device layout
    assert len(train_losses(run_dir)) == 4 and len(eval_rows(run_dir)) == 1


# --- resume -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A 2-epoch run with dropout, never stopped: the reference for the resume tests."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(small_config(run_dir), make_loaders=SyntheticData())
    return run_dir


@pytest.mark.parametrize(
    ("stop_at", "resumable"),
    [(4, True), (6, True), (9, False)],
    ids=["mid-epoch", "epoch-end", "mid-epoch-replaying-loader"],
)
def test_stop_and_resume_logs_the_same_losses(tmp_path, uninterrupted, stop_at, resumable):
    run_dir = tmp_path / "run"
    data = SyntheticData(resumable=resumable)
    train(small_config(run_dir, max_steps=stop_at), make_loaders=data)
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == stop_at
    assert train_losses(run_dir)[-1][0] == stop_at

    train(small_config(run_dir, resume=True), make_loaders=data)
    assert train_losses(run_dir) == train_losses(uninterrupted)  # exact floats
    assert eval_rows(run_dir) == eval_rows(uninterrupted)


def _train_in_subprocess(config_json: str, threads: str) -> None:
    """Entry point of the killed child process (see the test below)."""
    torch.set_num_threads(int(threads))
    config = TrainConfig(**json.loads(config_json))
    train(config, make_loaders=SyntheticData(delay=0.05))


def test_killed_run_resumes_exactly_and_its_checkpoint_is_always_whole(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    config = small_config(run_dir, checkpoint_every=1)
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_train; "
        "test_train._train_in_subprocess(sys.argv[1], sys.argv[2])"
    )
    arguments = [json.dumps(config.to_dict()), str(torch.get_num_threads())]
    child = subprocess.Popen([sys.executable, "-c", code, *arguments])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if len(read_rows(run_dir / "metrics.jsonl")) >= 4:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    # Whatever the kill interrupted, checkpoint.pt is a whole checkpoint and
    # only hidden temporary names were ever partial.
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert 3 <= checkpoint["step"] < 12
    names = {path.name for path in run_dir.iterdir()}
    assert all(
        name.startswith(".checkpoint.pt.tmp-")
        for name in names - {"checkpoint.pt", "config.json", "metrics.jsonl", "curves.png"}
    )

    train(config.replace(resume=True), make_loaders=SyntheticData())
    assert train_losses(run_dir) == train_losses(uninterrupted)
    assert not any(name.startswith(".") for name in os.listdir(run_dir))


class _ListDirectoryWhilePickled:
    """Records the run directory's files at the moment torch.save pickles it."""

    seen: list[str] = []

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __reduce__(self):
        type(self).seen = sorted(os.listdir(self.directory))
        return (int, (0,))


class _FailsWhilePickled:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_checkpoint_is_replaced_atomically(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"format": FORMAT, "step": 1})

    # Mid-write, the old checkpoint is untouched and the new bytes go to a hidden name.
    save_checkpoint(
        path, {"weights": torch.ones(1000), "spy": _ListDirectoryWhilePickled(tmp_path)}
    )
    seen = _ListDirectoryWhilePickled.seen
    assert "checkpoint.pt" in seen and len(seen) == 2
    assert [name for name in seen if name != "checkpoint.pt"][0].startswith(".checkpoint.pt.tmp-")

    # A write that fails half-way leaves the previous checkpoint and no debris.
    save_checkpoint(path, {"format": FORMAT, "step": 2})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"weights": torch.ones(10_000), "broken": _FailsWhilePickled()})
    assert load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_resume_refuses_changed_shapes_and_world_size(tmp_path):
    config = small_config(tmp_path / "run")
    checkpoint = {"config": config.to_dict(), "world_size": 1}
    check_resumable(checkpoint, config, 1)
    with pytest.raises(UserError, match="width"):
        check_resumable(checkpoint, config.replace(width=1 / 8), 1)
    with pytest.raises(UserError, match="2"):
        check_resumable(checkpoint, config, 2)


def test_resume_refuses_a_changed_schedule_in_one_line(tmp_path):
    """A --schedule step checkpoint holds no plateau state: a clear refusal, not a KeyError."""
    run_dir = tmp_path / "run"
    train(small_config(run_dir, schedule="step", max_steps=1), make_loaders=SyntheticData())
    with pytest.raises(UserError, match="--schedule was step in the checkpoint, now plateau"):
        train(small_config(run_dir, resume=True), make_loaders=SyntheticData())
    config = small_config(run_dir)
    checkpoint = {"config": config.to_dict(), "world_size": 1}
    with pytest.raises(UserError, match="--schedule was plateau in the checkpoint, now step"):
        check_resumable(checkpoint, config.replace(schedule="step"), 1)


def test_lr_follows_the_global_batch_unless_given(tmp_path):
    from trainer.config import default_lr

    assert default_lr(128) == 0.01 and default_lr(32) == 0.0025 and default_lr(1024) == 0.08
    # The default is resolved for the global batch and recorded in config.json ...
    run_dir = tmp_path / "default"
    resolved = train(small_config(run_dir, lr=None, max_steps=1), make_loaders=SyntheticData())
    assert resolved.lr == 0.01 * 8 / 128
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.01 * 8 / 128
    assert read_rows(run_dir / "metrics.jsonl")[0]["lr"] == 0.01 * 8 / 128
    # ... and an explicit rate wins.
    run_dir = tmp_path / "explicit"
    train(small_config(run_dir, lr=0.003, max_steps=1), make_loaders=SyntheticData())
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.003


def test_lr_help_states_the_rule():
    from click.testing import CliRunner

    from alexpipe.commands.train import train as train_command

    result = CliRunner().invoke(train_command, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "0.01 x global batch / 128" in " ".join(result.output.split())


def test_a_checkpoint_of_the_old_format_is_refused_for_resume_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    train(small_config(run_dir, max_steps=1), make_loaders=SyntheticData())
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    checkpoint["format"] = "alexpipe-checkpoint/1"
    checkpoint["scheduler"] = {"kind": "plateau", "best_error": 0.5, "reductions": 0}
    save_checkpoint(run_dir / CHECKPOINT_NAME, checkpoint)
    with pytest.raises(UserError, match="old format alexpipe-checkpoint/1") as refusal:
        train(small_config(run_dir, resume=True), make_loaders=SyntheticData())
    assert "\n" not in str(refusal.value)
    # Its weights are what they were: evaluation still reads them.
    _, val_loader = SyntheticData()(small_config(run_dir), 0, 1)
    results = evaluate_checkpoint(
        "unused", run_dir / CHECKPOINT_NAME, device="cpu", loader=val_loader
    )
    assert results["num_images"] == 16


def test_run_directory_rules(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="--resume"):
        train(small_config(run_dir, resume=True), make_loaders=SyntheticData())
    train(small_config(run_dir, max_steps=1), make_loaders=SyntheticData())
    with pytest.raises(UserError, match="already holds a run"):
        train(small_config(run_dir), make_loaders=SyntheticData())
    with pytest.raises(UserError, match="schedule"):
        small_config(run_dir, schedule="cosine")


# --- evaluation -------------------------------------------------------------------------------


def test_ten_crop_evaluation_averages_softmax_over_patches():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 3))
    patches = torch.randn(4, 10, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 1])
    results = evaluate(network, [(patches[:2], labels[:2]), (patches[2:], labels[2:])], "cpu")

    with torch.no_grad():
        probabilities = network(patches.flatten(0, 1)).softmax(1).view(4, 10, 3).mean(1)
    expected_top1 = (probabilities.argmax(1) != labels).double().mean().item()
    expected_loss = -probabilities[torch.arange(4), labels].log().mean().item()
    assert results["num_images"] == 4
    assert results["top1_err"] == pytest.approx(expected_top1)
    assert results["top5_err"] == 0.0
    assert results["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    # Ten identical patches give the single-crop result.
    single = evaluate(network, [(patches[:, 0], labels)], "cpu")
    repeated = evaluate(network, [(patches[:, :1].expand(-1, 10, -1, -1, -1), labels)], "cpu")
    assert repeated["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert repeated["top1_err"] == single["top1_err"]


def test_top5_error_counts_a_hit_anywhere_in_the_top_five():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [9.0, 8, 7, 6, 5, 4, 3]])

    class Fixed(nn.Module):
        def forward(self, images):
            return logits[: images.shape[0]]

    results = evaluate(Fixed(), [(torch.zeros(2, 3, 1, 1), torch.tensor([4, 5]))], "cpu")
    assert results["top1_err"] == 1.0 and results["top5_err"] == 0.5


# --- pieces -----------------------------------------------------------------------------------


def test_measure_batches_times_the_wait_for_data():
    def slow_batches():
        for index in range(3):
            time.sleep(0.05)
            yield index

    timed = list(measure_batches(slow_batches()))
    assert [batch for batch, _ in timed] == [0, 1, 2]
    assert all(0.04 <= wait < 1.0 for _, wait in timed)


def _rates(config: TrainConfig, errors: list[float | None]) -> tuple[list[float], object]:
    """The rate after each epoch of a schedule fed ``errors``, and the schedule."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = create_schedule(config, optimizer)
    rates = []
    for error in errors:
        optimizer.step()  # (torch checks that the optimizer stepped first)
        end_epoch(schedule, error)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates, schedule


def test_plateau_schedule_divides_by_ten_at_most_three_times(tmp_path):
    config = small_config(tmp_path, plateau_patience=2, plateau_threshold=1e-3)
    errors = [0.9, 0.8, 0.8, 0.8005] + [0.8] * 10
    rates, schedule = _rates(config, errors)
    assert type(schedule).__name__ == "ReduceLROnPlateau"
    # Two epochs without an improvement of 1e-3 (0.8005 is none): ÷10.
    assert rates[:4] == [0.01, 0.01, 0.01, pytest.approx(0.001)]
    assert rates[5] == pytest.approx(1e-4) and rates[7] == pytest.approx(1e-5)
    assert rates[-1] == rates[7]  # three divisions, then never again
    assert len(set(rates)) == 4
    # No val split: the rate stays.
    assert _rates(config, [None] * 10)[0] == [0.01] * 10

    # Its state goes into the checkpoint and comes back.
    path = tmp_path / "schedule.pt"
    save_checkpoint(path, {"format": FORMAT, "scheduler": schedule.state_dict()})
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    restored = create_schedule(config, optimizer)
    restored.load_state_dict(load_checkpoint(path)["scheduler"])
    optimizer.param_groups[0]["lr"] = rates[-1]  # (the optimizer's own state holds the rate)
    for _ in range(5):
        optimizer.step()
        end_epoch(restored, 0.8)
    assert optimizer.param_groups[0]["lr"] == rates[-1]


@pytest.mark.parametrize("lr", [0.01, 0.0025, 3e-7, 0.08])
def test_plateau_schedule_cap_holds_for_any_rate(tmp_path, lr):
    """The cap is torch's min_lr; float noise in lr * 0.1**3 must neither block the
    third division nor let a fourth through."""
    rates, _ = _rates(small_config(tmp_path, lr=lr, plateau_patience=1), [0.5] * 8)
    assert rates[:4] == [
        lr,
        pytest.approx(lr / 10),
        pytest.approx(lr / 100),
        pytest.approx(lr / 1000),
    ]
    assert rates[4:] == [rates[3]] * 4


def test_step_schedule(tmp_path):
    config = small_config(tmp_path, schedule="step", step_epochs=30)
    rates, schedule = _rates(config, [None] * 120)
    assert type(schedule).__name__ == "MultiStepLR"
    rates = dict(enumerate(rates, start=1))  # epochs done -> rate of the next epoch
    assert rates[29] == 0.01 and rates[30] == pytest.approx(0.001)
    assert rates[60] == pytest.approx(1e-4) and rates[120] == pytest.approx(1e-5)
    assert rates[90] == rates[120]


# --- command line -----------------------------------------------------------------------------


def test_commands_report_bad_input_as_user_errors(tmp_path):
    from click.testing import CliRunner

    from alexpipe.commands.train import eval_command
    from alexpipe.commands.train import train as train_command

    runner = CliRunner()
    missing = str(tmp_path / "missing")
    result = runner.invoke(train_command, ["--shards", missing, "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, UserError) and "missing" in str(result.exception)
    result = runner.invoke(
        train_command, ["--shards", missing, "--out", str(tmp_path / "run"), "--nproc", "0"]
    )
    assert isinstance(result.exception, UserError) and "--nproc" in str(result.exception)
    result = runner.invoke(
        eval_command, ["--shards", missing, "--checkpoint", missing, "--device", "cpu"]
    )
    assert isinstance(result.exception, UserError) and "no checkpoint" in str(result.exception)


# --- GPU --------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "options",
    [{"bf16": True, "channels_last": True}, {"parallel": "columns", "bf16": True}],
    ids=["ddp-bf16-channels-last", "columns-bf16"],
)
def test_gpu_run_learns_and_resumes(tmp_path, options):
    data = SyntheticData(train_samples=64, val_samples=32)
    base = small_config(tmp_path / "run", device="cuda", dropout=0.0, epochs=3, **options)
    train(base.replace(max_steps=10), make_loaders=data)
    train(base.replace(resume=True), make_loaders=data)
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])
    assert eval_rows(tmp_path / "run")[-1]["top1_err"] < 0.6  # chance: 0.75
