"""tools/bench_train.py measures real-data and synthetic-data training speed (CPU here)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools/bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("parallel", ["single", "columns"])
def test_bench_train_reports_both_speeds(bench_train, shard_dir, parallel):
    result = bench_train.main(
        [
            "--shards",
            str(shard_dir),
            "--device",
            "cpu",
            "--backend",
            "dali",
            "--width",
            "0.0625",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--num-threads",
            "1",
            "--parallel",
            parallel,
        ]
    )
    assert result["synthetic_img_per_s"] > 0 and result["real_img_per_s"] > 0
    assert 0 <= result["real_data_wait_frac"] <= 1
    assert result["real_vs_synthetic"] == pytest.approx(
        result["real_img_per_s"] / result["synthetic_img_per_s"], rel=0.01
    )


def test_the_wait_before_the_clock_starts_is_not_counted(bench_train):
    """The wait for the batch on which the counters are reset fell before the reset."""
    import argparse

    import torch

    from trainer.model import AlexNet

    arguments = argparse.Namespace(device="cpu", channels_last=False, bf16=False)
    network = AlexNet(num_classes=2, width=1 / 16)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    batch = (torch.zeros(2, 3, 224, 224), torch.tensor([0, 1]))
    warm_up = bench_train.WARM_UP_STEPS
    # Long (pretended) waits up to and including the batch the clock starts at, none after.
    waits = [1000.0] * (warm_up + 1) + [0.0, 0.0]
    result = bench_train.run_steps(
        network, optimizer, [(batch, wait) for wait in waits], 3, arguments
    )
    assert result["data_wait_frac"] == 0.0
    # A wait inside the timed window is counted.
    waits[-1] = 1000.0
    result = bench_train.run_steps(
        network, optimizer, [(batch, wait) for wait in waits], 3, arguments
    )
    assert result["data_wait_frac"] > 1
