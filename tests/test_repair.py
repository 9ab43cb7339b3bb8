"""`alexpipe verify DIR --repair --src SRC`: real photographs, a real build on real Ray,
bit rot and a lost shard repaired byte-identical to a clean build (statistics
included), and a wrong --src refused without changing a byte."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alexpipe.sample.photos import write_photo_folder
from pipeline.build.config import BuildConfig
from pipeline.build.job import build_shards
from pipeline.build.ray_runtime import ray_session
from pipeline.build.repair import STAGING_NAME, RepairConfig, repair_shards
from shards.errors import UserError
from shards.reader import iter_members
from shards.verify import verify_directory, verify_shards

ROOT = Path(__file__).resolve().parent.parent
ALEXPIPE = [sys.executable, "-m", "alexpipe.cli"]
PHOTOS = dict(num_classes=4, train_per_class=6, val_per_class=2)
SHARD_SIZE = 7  # 24 train images: 4 shards, the last one short; 8 val: 2 shards


@pytest.fixture(scope="module")
def ray_cluster():
    """One private loopback Ray instance shared by the builds and repairs here."""
    with ray_session(None, 2):
        yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos") / "src", **PHOTOS).root


@pytest.fixture(scope="module")
def clean_build(photos, tmp_path_factory, ray_cluster) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shards"
    build_shards(BuildConfig(src=photos, out=out, shard_size=SHARD_SIZE, progress=False))
    return out


def _file_hashes(directory: Path) -> dict[str, str]:
    """Every entry's sha256 (folders too, as None: none may be left behind)."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        for path in sorted(directory.iterdir())
    }


@pytest.fixture
def shards(clean_build, tmp_path) -> Path:
    """A copy of the clean build to damage."""
    copy = tmp_path / "shards"
    shutil.copytree(clean_build, copy)
    return copy


def _rot_jpeg(tar_path: Path, position: int = 0) -> str:
    """Overwrite 2 KB in the middle of one sample's JPEG (the ``position``-th) with
    garbage: bit rot, the size unchanged. Returns the sample's key."""
    member = [m for m in iter_members(tar_path) if m.name.endswith(".jpg")][position]
    data = bytearray(tar_path.read_bytes())
    middle = member.data_offset + member.size // 2
    garbage = np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    data[middle - 1024 : middle + 1024] = garbage
    tar_path.write_bytes(bytes(data))
    return member.name.split(".")[0]


def _repair(shards_dir: Path, src: Path) -> list[str]:
    report = verify_directory(shards_dir)
    return repair_shards(RepairConfig(shards_dir=shards_dir, src=src, workers=2), report)


def test_bit_rot_is_named_then_repaired_byte_identical(shards, clean_build, photos, ray_cluster):
    clean = _file_hashes(clean_build)
    assert {"stats.json", "mean.npy", "mean.png", "rejected.jsonl"} <= set(clean)
    tar_path = shards / "train-000002.tar"
    key = _rot_jpeg(tar_path, position=1)
    assert tar_path.stat().st_size == (clean_build / "train-000002.tar").stat().st_size

    problems = verify_shards(shards)
    assert len(problems) == 1
    assert problems[0].startswith("train-000002.tar: sha256 mismatch (expected ")
    assert f"; sample {key}.jpg does not decode (" in problems[0]

    assert _repair(shards, photos) == ["train-000002.tar"]
    assert verify_shards(shards, decode=True) == []
    assert _file_hashes(shards) == clean  # shards, index, stats, mean, manifest: all of it


def test_a_lost_shard_and_a_lost_index_are_made_again(shards, clean_build, photos, ray_cluster):
    (shards / "train-000001.tar").unlink()
    (shards / "val-000001.idx").unlink()
    assert verify_directory(shards).failing_shards == ["train-000001.tar", "val-000001.tar"]
    assert _repair(shards, photos) == ["train-000001.tar", "val-000001.tar"]
    assert _file_hashes(shards) == _file_hashes(clean_build)


def test_other_photographs_under_the_same_names_are_refused(shards, tmp_path, ray_cluster):
    other = write_photo_folder(tmp_path / "other", seed=1, **PHOTOS).root  # same file names
    _rot_jpeg(shards / "val-000000.tar", position=1)
    before = _file_hashes(shards)
    with pytest.raises(UserError) as refused:
        _repair(shards, other)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--src {other} makes val-000000.tar as ")
    assert "nothing was changed" in message
    assert _file_hashes(shards) == before
    assert not (shards / STAGING_NAME).exists()


def test_other_inputs_are_refused_before_any_work(shards, tmp_path, ray_cluster):
    fewer = write_photo_folder(tmp_path / "fewer", **{**PHOTOS, "train_per_class": 5}).root
    (shards / "train-000000.tar").unlink()
    before = _file_hashes(shards)
    with pytest.raises(UserError) as refused:
        _repair(shards, fewer)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--src {fewer} ")
    assert "give the --src it was built from" in message or "shards than" in message
    assert _file_hashes(shards) == before
    more_classes = write_photo_folder(tmp_path / "classes", **{**PHOTOS, "num_classes": 5}).root
    with pytest.raises(UserError, match=r"has 5 classes, .* was built from 4 other ones"):
        _repair(shards, more_classes)


def test_the_command_says_what_it_rebuilt(shards, clean_build, photos):
    _rot_jpeg(shards / "val-000001.tar")
    command = [*ALEXPIPE, "verify", str(shards), "--no-progress", "--workers", "2"]
    result = subprocess.run(
        [*command, "--repair", "--src", str(photos)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["rebuilt val-000001.tar", f"OK {shards}"]
    assert result.stderr.startswith("FAIL val-000001.tar: sha256 mismatch")
    assert _file_hashes(shards) == _file_hashes(clean_build)
