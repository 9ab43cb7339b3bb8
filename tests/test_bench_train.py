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
