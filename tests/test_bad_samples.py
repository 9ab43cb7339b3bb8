"""Samples that do not decode, in both backends: named in one line, or skipped and logged.

The shards are a real build (``alexpipe build-shards``) of real photographs;
two JPEGs inside one shard are then overwritten with garbage of the same
size, as bit rot would (the tar stays a valid tar, its sha256 no longer
matches the manifest). The two sit in the same batch of the first epoch,
which is chosen so that an epoch abandoned after its first batch leaves the
bad batch prefetched. What the tests expect of a bad sample (its shard, key
and index) is read from the tar with ``shards.reader``, not from the loader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from alexpipe.sample.photos import write_photo_folder
from pipeline.load.bad_samples import AllSamplesBadError, BadSampleError
from pipeline.load.loader import create_loader
from shards.index import parse_index
from shards.manifest import write_manifest
from shards.reader import iter_shard, sha256_of_file
from shards.remote import read_manifest
from trainer.config import TrainConfig
from trainer.metrics import read_rows
from trainer.run import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ALEXPIPE = [sys.executable, "-m", "alexpipe.cli"]
BATCH_SIZE = 8
SEED = 0
BAD_BATCH = 2  # of epoch 0, one rank: past the first batch and the prefetch queue behind it
DALI_REASON = r"nvImageCodec failure: '#\d+'"
TORCH_REASON = "PIL: cannot identify image file"


def alexpipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*ALEXPIPE, *args], capture_output=True, text=True, env=environment, timeout=timeout
    )


@dataclasses.dataclass(frozen=True)
class Bad:
    """A corrupted sample as the tar says: shard file, key, index (KEY.json), split position."""

    shard: str
    key: str
    index: int
    position: int


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A real build of real photographs: 40 train images in 5 shards, 12 val."""
    root = tmp_path_factory.mktemp("built")
    write_photo_folder(root / "src", num_classes=4, train_per_class=10, val_per_class=3)
    result = alexpipe(
        "build-shards", "--src", str(root / "src"), "--out", str(root / "shards"),
        "--shard-size", "8", "--workers", "2", "--quality", "90",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "shards"


def sample_at(directory: Path, position: int) -> tuple[Path, int]:
    """(shard path, number inside the shard) of a train position, from the manifest."""
    for info in read_manifest(directory).split("train").shards:
        if position < info.num_samples:
            return directory / info.file, position
        position -= info.num_samples
    raise AssertionError("position past the split")


def overwrite_jpeg(tar: Path, number: int, seed: int) -> Bad:
    """Overwrite sample ``number``'s JPEG in ``tar`` with random bytes of the same size."""
    sample = parse_index(tar.with_suffix(".idx").read_text())[number]
    jpg = next(component for component in sample.components if component.ext == "jpg")
    key, parts = list(iter_shard(tar))[number]
    data = bytearray(tar.read_bytes())
    garbage = np.random.default_rng(seed).integers(0, 256, jpg.size, dtype=np.uint8)
    data[jpg.offset : jpg.offset + jpg.size] = garbage.tobytes()
    tar.write_bytes(bytes(data))
    return Bad(tar.name, key, json.loads(parts["json"])["index"], -1)


@pytest.fixture(scope="module")
def corrupted(built, tmp_path_factory) -> tuple[Path, list[Bad]]:
    """A copy of ``built`` with the first two samples of batch BAD_BATCH of epoch 0
    (one rank, BATCH_SIZE, SEED) overwritten, in that batch's order."""
    directory = tmp_path_factory.mktemp("corrupted") / "shards"
    shutil.copytree(built, directory)
    with closing(create_loader(built, "train", BATCH_SIZE, backend="torch", seed=SEED)) as loader:
        positions = loader.plan(0).batch(BAD_BATCH)[:2]
    bad = []
    for number, position in enumerate(positions.tolist()):
        tar, in_shard = sample_at(directory, position)
        bad.append(dataclasses.replace(overwrite_jpeg(tar, in_shard, number), position=position))
    assert sha256_of_file(directory / bad[0].shard) != sha256_of_file(built / bad[0].shard)
    return directory, bad


def loader_of(directory: Path, batch_size: int = BATCH_SIZE, **options):
    """A train loader over ``directory`` (closed at the end of a ``with``)."""
    settings = dict(backend="torch", seed=SEED, num_threads=1, with_index=True)
    return closing(create_loader(directory, "train", batch_size, **{**settings, **options}))


def all_indices(directory: Path) -> list[int]:
    with loader_of(directory) as loader:
        return sorted(index for _, _, indices in loader for index in indices.tolist())


def delivery_order(directory: Path, rank: int, world_size: int) -> list[int]:
    """The positions of ``rank``'s epoch 0, in the order its batches hand them out."""
    options = dict(rank=rank, world_size=world_size)
    with loader_of(directory, BATCH_SIZE // world_size, **options) as loader:
        return loader.plan(0).positions.tolist()


def stop_line(bad: Bad, directory: Path, reason: str, matches: bool = False) -> str:
    """The one line a stopped run must give (``reason`` a regular expression)."""
    named = re.escape(f"{bad.shard}: sample {bad.key} (index {bad.index}) does not decode (")
    named += reason + r"\)"
    where = re.escape(str(directory))
    repair = f"alexpipe verify {where} --repair --src SRC"
    then = re.escape(", then --resume (or --on-bad-sample skip to train without it)")
    if matches:
        return (
            named
            + re.escape(", though the shard's sha256 matches the manifest (it was built so); ")
            + f"run alexpipe verify {where} --decode, rebuild with {repair}" + then
        )  # fmt: skip
    return (
        named + re.escape(", and the shard's sha256 no longer matches the manifest; ")
        + f"run alexpipe verify {where}, rebuild with {repair}" + then
    )  # fmt: skip


def reason_of(backend: str) -> str:
    return DALI_REASON if backend == "dali" else re.escape(TORCH_REASON)


# --- stop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_stop_names_shard_key_index_and_the_sha256_mismatch(corrupted, backend, world_size):
    directory, bad = corrupted
    stopped = []
    for rank in range(world_size):
        order = delivery_order(directory, rank, world_size)
        mine = sorted(
            (b for b in bad if b.position in order), key=lambda b: order.index(b.position)
        )
        options = dict(backend=backend, rank=rank, world_size=world_size)
        with loader_of(directory, BATCH_SIZE // world_size, **options) as loader:
            if not mine:
                assert sum(len(indices) for _, _, indices in loader) == len(order)
                continue
            with pytest.raises(BadSampleError) as raised:
                list(loader)
        # The first bad sample this rank meets ends its epoch, in one line.
        message = str(raised.value)
        assert re.fullmatch(stop_line(mine[0], directory, reason_of(backend)), message), message
        assert raised.value.sample.position == mine[0].position
        stopped.append(rank)
    assert stopped


def test_two_bad_batches_in_a_row_stop_at_the_first(corrupted):
    """Batch size 1: the second bad sample's batch is in DALI's queue when the first fails;
    it must not replace the first one's error (no drain of a failed pipeline)."""
    directory, bad = corrupted
    with loader_of(directory, 1, backend="dali") as loader, pytest.raises(BadSampleError) as raised:
        list(loader)
    assert re.fullmatch(stop_line(bad[0], directory, DALI_REASON), str(raised.value))


def test_stop_says_when_the_shard_still_matches_its_manifest(corrupted, tmp_path):
    directory, bad = corrupted
    rebuilt = tmp_path / "shards"
    shutil.copytree(directory, rebuilt)
    manifest = read_manifest(rebuilt)
    entry = manifest.split("train")
    shards = tuple(
        dataclasses.replace(info, sha256=sha256_of_file(rebuilt / info.file))
        for info in entry.shards
    )
    splits = {**manifest.splits, "train": dataclasses.replace(entry, shards=shards)}
    write_manifest(rebuilt, dataclasses.replace(manifest, splits=splits))
    with loader_of(rebuilt, num_threads=0) as loader, pytest.raises(BadSampleError) as raised:
        list(loader)
    expected = stop_line(bad[0], rebuilt, re.escape(TORCH_REASON), matches=True)
    assert re.fullmatch(expected, str(raised.value)), str(raised.value)


# --- skip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_skip_gives_every_other_sample_exactly_once(corrupted, built, backend, world_size):
    directory, bad = corrupted
    expected = sorted(set(all_indices(built)) - {b.index for b in bad})
    seen = {epoch: [] for epoch in range(2)}
    skipped = {epoch: [] for epoch in range(2)}
    for rank in range(world_size):
        options = dict(backend=backend, rank=rank, world_size=world_size, on_bad_sample="skip")
        with loader_of(directory, BATCH_SIZE // world_size, **options) as loader:
            for epoch in range(2):
                for images, labels, indices in loader:
                    assert images.shape[0] == labels.shape[0] == indices.shape[0] >= 1
                    seen[epoch] += indices.tolist()
                    skipped[epoch] += [
                        (sample.shard, sample.key, sample.index) for sample in loader.take_skipped()
                    ]
    for epoch in range(2):
        assert sorted(seen[epoch]) == expected  # every other sample, each once, over the ranks
        assert sorted(skipped[epoch]) == sorted((b.shard, b.key, b.index) for b in bad)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_skipped_batch_keeps_the_other_samples_pixels(corrupted, built, backend):
    directory, bad = corrupted

    def images_by_index(shards: Path, policy: str) -> dict[int, torch.Tensor]:
        with loader_of(shards, backend=backend, on_bad_sample=policy) as loader:
            return {
                index: image
                for images, _, indices in loader
                for image, index in zip(images, indices.tolist(), strict=True)
            }

    clean, skipping = images_by_index(built, "stop"), images_by_index(directory, "skip")
    assert sorted(skipping) == sorted(set(clean) - {b.index for b in bad})
    for index, image in skipping.items():
        assert torch.equal(image, clean[index]), index  # the same crop, flip and lighting


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_batch_of_only_bad_samples_is_one_line(corrupted, backend):
    directory, bad = corrupted
    with loader_of(directory, 1, backend=backend, on_bad_sample="skip") as loader:
        with pytest.raises(AllSamplesBadError) as raised:
            list(loader)
    message = str(raised.value)
    assert message.startswith("every sample of batch ") and "\n" not in message
    assert f"{bad[0].shard}: {bad[0].key} (index {bad[0].index})" in message
    assert f"alexpipe verify {directory} --repair --src SRC" in message


def test_an_epoch_abandoned_before_a_bad_batch_leaves_the_next_one_whole(corrupted, built):
    """The drain of the abandoned epoch meets the bad batch in DALI's queue: no error from
    there, and the next epoch runs on a new pipeline."""
    directory, bad = corrupted
    with loader_of(directory, backend="dali", on_bad_sample="skip") as loader:
        abandoned = iter(loader)
        next(abandoned)  # batches 1 and BAD_BATCH are now in DALI's queue
        loader.set_epoch(1)  # and the next iter() closes the abandoned epoch, draining them
        seen = [index for _, _, indices in loader for index in indices.tolist()]
        assert sorted(seen) == sorted(set(all_indices(built)) - {b.index for b in bad})
        assert sorted(s.index for s in loader.take_skipped()) == sorted(b.index for b in bad)


# --- the trainer -----------------------------------------------------------------------------

TINY_RUN = ["--device", "cpu", "--width", "0.0625", "--batch-size", str(BATCH_SIZE)]
TINY_RUN += ["--num-threads", "1", "--seed", str(SEED), "--log-every", "2"]


def test_train_stops_with_one_line_and_exit_1(corrupted, tmp_path):
    directory, bad = corrupted
    run_dir = tmp_path / "run"
    result = alexpipe(
        "train", "--shards", str(directory), "--out", str(run_dir), "--backend", "dali",
        "--epochs", "1", *TINY_RUN,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    # Besides the progress bar of the steps done (tqdm's "epoch 1/1: ..."), one line.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("epoch 1/1: ")]
    assert len(lines) == 1, result.stderr
    expected = "alexpipe: error: " + stop_line(bad[0], directory, DALI_REASON)
    assert re.fullmatch(expected, lines[0]), lines[0]


def skip_rows_expected(directory: Path, bad: list[Bad], world_size: int, epochs: int) -> list:
    """The metrics rows of the skips: each bad sample, each epoch, at its batch's step."""
    rows = []
    for rank in range(world_size):
        options = dict(rank=rank, world_size=world_size)
        with loader_of(directory, BATCH_SIZE // world_size, **options) as loader:
            for epoch in range(epochs):
                plan = loader.plan(epoch)
                for number in range(plan.num_batches):
                    for b in bad:
                        if b.position in plan.batch(number):
                            row = {"shard": b.shard, "key": b.key, "index": b.index}
                            step = epoch * len(loader) + number + 1
                            rows.append({"epoch": epoch + 1, "step": step, "skipped": row})
    return sorted(rows, key=lambda row: (row["step"], row["skipped"]["index"]))


def skip_rows(run_dir: Path) -> list:
    rows = [row for row in read_rows(run_dir / "metrics.jsonl") if "skipped" in row]
    return sorted(rows, key=lambda row: (row["step"], row["skipped"]["index"]))


def test_train_skip_on_two_processes_logs_each_skip_and_a_summary(corrupted, tmp_path):
    directory, bad = corrupted
    run_dir = tmp_path / "run"
    result = alexpipe(
        "train", "--shards", str(directory), "--out", str(run_dir), "--backend", "dali",
        "--epochs", "2", "--nproc", "2", "--on-bad-sample", "skip", *TINY_RUN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert skip_rows(run_dir) == skip_rows_expected(directory, bad, 2, 2)
    named = ", ".join(f"{b.shard}: {b.key} (index {b.index})" for b in sorted(
        bad, key=lambda b: (b.shard, b.key)))  # fmt: skip
    summary = (
        f"skipped 2 bad samples ({named}) 4 times in all, each a 'skipped' row of "
        f"metrics.jsonl; run alexpipe verify {directory}, rebuild with alexpipe verify "
        f"{directory} --repair --src SRC"
    )
    assert result.stdout.splitlines()[-1] == summary
    assert json.loads((run_dir / "config.json").read_text())["on_bad_sample"] == "skip"


def test_train_skip_in_one_process_logs_each_skip(corrupted, tmp_path):
    directory, bad = corrupted
    run_dir = tmp_path / "run"
    config = TrainConfig(
        shards_dir=str(directory), out_dir=str(run_dir), epochs=2, batch_size=BATCH_SIZE,
        device="cpu", backend="torch", width=1 / 16, num_threads=0, seed=SEED, log_every=3,
        progress=False, on_bad_sample="skip",
    )  # fmt: skip
    train(config)
    assert skip_rows(run_dir) == skip_rows_expected(directory, bad, 1, 2)
