"""Data-parallel training with real torch.distributed (gloo on 127.0.0.1, CPU processes)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import NUM_CLASSES, SyntheticData, small_config, train_losses

from shards.errors import UserError
from shards.manifest import MEAN_NAME
from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from trainer.distributed import run_distributed
from trainer.model import AlexNet
from trainer.run import train

TESTS_DIR = Path(__file__).resolve().parent


def test_two_processes_step_like_one_process_on_the_whole_batch(tmp_path):
    """DDP over 2 gloo processes, one SGD step == 1 process on the concatenated batch."""
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    # Dropout off: the two runs draw their masks differently.
    train(small_config(ddp_dir, nproc=2, max_steps=1, dropout=0.0), make_loaders=SyntheticData())
    train(small_config(single_dir, max_steps=1, dropout=0.0), make_loaders=SyntheticData())

    # The ranks' first batches (samples order[0::2][:4] and order[1::2][:4])
    # together are the single process's first batch (order[:8]).
    ddp, single = (load_checkpoint(path / CHECKPOINT_NAME) for path in (ddp_dir, single_dir))
    torch.manual_seed(0)
    initial = AlexNet(NUM_CLASSES, width=1 / 16).state_dict()
    for name, expected in single["model"].items():
        assert torch.allclose(ddp["model"][name], expected, rtol=1e-5, atol=1e-7), name
    assert not torch.allclose(single["model"]["fc8.weight"], initial["fc8.weight"], atol=1e-5)
    [(_, ddp_loss)], [(_, single_loss)] = train_losses(ddp_dir), train_losses(single_dir)
    assert abs(ddp_loss - single_loss) < 1e-5  # the logged loss is the global batch's mean

    # What the two-process run recorded: the world, and every rank's RNG and loader position.
    record = json.loads((ddp_dir / "config.json").read_text())
    assert record["world_size"] == 2 and record["per_process_batch_size"] == 4
    assert ddp["world_size"] == 2 and ddp["step"] == 1 and len(ddp["rng"]) == 2
    assert not torch.equal(ddp["rng"][0]["torch"], ddp["rng"][1]["torch"])
    assert [state["batches_consumed"] for state in ddp["loader"]] == [1, 1]


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_two_nodes_on_loopback(tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "train_script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from pathlib import Path\n"
        "from test_train import SyntheticData, small_config\n"
        "from trainer.run import train\n"
        f"train(small_config(Path({str(run_dir)!r}), epochs=1), make_loaders=SyntheticData())\n"
    )
    port = _free_loopback_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(port),
                str(script),
            ],
            env=environment,
        )
        for node in (0, 1)
    ]  # fmt: skip
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert codes == [0, 0]
    record = json.loads((run_dir / "config.json").read_text())
    assert record["world_size"] == 2
    assert [step for step, _ in train_losses(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["world_size"] == 2


# --- errors in --nproc runs: one line, no traceback -------------------------------------------


def _refuse_on_rank_one(context):
    if context.rank == 1:
        raise UserError("rank 1 refuses")
    torch.distributed.barrier()  # rank 0 waits for a peer that is gone


def test_a_user_error_in_one_process_is_raised_by_the_parent():
    with pytest.raises(UserError, match="^rank 1 refuses$"):
        run_distributed(_refuse_on_rank_one, 2, "cpu")


def test_a_global_batch_that_does_not_divide_is_refused_before_any_process_starts(
    tmp_path, monkeypatch
):
    with pytest.raises(UserError, match="--batch-size 8 .* divide evenly over 3 processes"):
        train(small_config(tmp_path / "nproc", nproc=3), make_loaders=SyntheticData())
    # Under torchrun its world size counts, before the process joins the group.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="divide evenly over 3 processes"):
        train(small_config(tmp_path / "torchrun"), make_loaders=SyntheticData())


def test_columns_under_a_multi_process_torchrun_are_refused_in_one_line(tmp_path, monkeypatch):
    """Every process would place its two columns on cuda:0 and cuda:1 (and DDP fail)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="^--parallel columns runs in one process") as refusal:
        train(small_config(tmp_path / "run", parallel="columns"), make_loaders=SyntheticData())
    assert "\n" not in str(refusal.value) and "torchrun" in str(refusal.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    # One process under torchrun is fine for columns.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_loopback_port()))
    config = small_config(tmp_path / "one", parallel="columns", max_steps=1)
    train(config, make_loaders=SyntheticData())
    assert load_checkpoint(tmp_path / "one" / CHECKPOINT_NAME)["step"] == 1


def _alexpipe(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "alexpipe.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,
    )


def _assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("alexpipe: error: "), result.stderr
    for words in expected:
        assert words in lines[0], lines[0]


TINY_RUN = ["--device", "cpu", "--backend", "torch", "--num-threads", "0"]
TINY_RUN += ["--width", "0.0625", "--batch-size", "8", "--epochs", "1"]


def test_a_user_error_inside_the_processes_is_one_line(shard_dir, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    (broken / MEAN_NAME).unlink()  # every process's loader refuses the shards
    result = _alexpipe(
        "train", "--shards", str(broken), "--out", str(tmp_path / "run"), "--nproc", "2", *TINY_RUN
    )
    _assert_one_error_line(result, "mean.npy is missing")


def test_resume_with_another_nproc_is_one_line(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    # A one-process run with what the command line gives: the shards' 3 classes.
    config = small_config(run_dir, num_classes=3, max_steps=1)
    train(config, make_loaders=SyntheticData())
    result = _alexpipe(
        "train", "--shards", str(shard_dir), "--out", str(run_dir), "--nproc", "2", "--resume",
        *TINY_RUN,
    )  # fmt: skip
    _assert_one_error_line(result, "written by 1 processes", "this run has 2")
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 1
