"""The CPU path is deterministic: the same seed on the same machine gives the same metrics.

Real shards, the real DALI CPU loader (and the torch one), the real trainer
and ten-crop evaluation, twice with one seed: every logged loss, rate and
error is the same float, and the checkpoints hold the same weights. This is
what `alexpipe demo` relies on for its README figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from trainer.config import TrainConfig
from trainer.evaluation import evaluate_checkpoint
from trainer.metrics import read_rows
from trainer.run import train

# Timings differ from run to run; everything else in metrics.jsonl must not.
TIMINGS = ("img_per_s", "data_wait_frac")


def _run(
    shard_dir: Path, run_dir: Path, backend: str, seed: int = 0, max_steps: int | None = None
) -> tuple[list, dict | None]:
    config = TrainConfig(
        shards_dir=str(shard_dir),
        out_dir=str(run_dir),
        epochs=2,
        batch_size=16,
        width=1 / 16,
        device="cpu",
        backend=backend,
        schedule="step",
        step_epochs=1,
        seed=seed,
        deterministic=True,
        # The torch backend in the training process: worker processes cost more here.
        num_threads=2 if backend == "dali" else 0,
        max_steps=max_steps,
        log_every=1,
        progress=False,
    )
    train(config)
    rows = [
        {key: value for key, value in row.items() if key not in TIMINGS}
        for row in read_rows(run_dir / "metrics.jsonl")
    ]
    if max_steps is not None:
        return rows, None
    results = evaluate_checkpoint(
        shard_dir, run_dir / CHECKPOINT_NAME, ten_crop=True, backend=backend, device="cpu",
        batch_size=8, num_threads=2 if backend == "dali" else 0,
    )  # fmt: skip
    return rows, results


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_same_seed_same_metrics(shard_dir, tmp_path, backend):
    first_rows, first_results = _run(shard_dir, tmp_path / "first", backend)
    second_rows, second_results = _run(shard_dir, tmp_path / "second", backend)
    assert len(first_rows) == 2 * 6 + 2  # 96 images / 16: 6 rows per epoch, and 2 evaluations
    assert first_rows == second_rows  # exact floats
    assert first_results == second_results
    first = load_checkpoint(tmp_path / "first" / CHECKPOINT_NAME)["model"]
    second = load_checkpoint(tmp_path / "second" / CHECKPOINT_NAME)["model"]
    assert all(torch.equal(first[name], second[name]) for name in first)
    # The rate of the second epoch is the step schedule's.
    [second_epoch_rate] = {
        row["lr"] for row in first_rows if row.get("epoch") == 2 and "loss" in row
    }
    assert second_epoch_rate == pytest.approx(0.1 * 0.01 * 16 / 128)

    # Another seed is another run (the comparison above is not vacuous).
    other_rows, _ = _run(shard_dir, tmp_path / "other", backend, seed=1, max_steps=3)
    assert [row["loss"] for row in other_rows] != [row["loss"] for row in first_rows[:3]]
