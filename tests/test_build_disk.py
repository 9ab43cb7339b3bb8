"""build-shards into a filesystem that fills up, or that is read-only (from the start or
mid-build): one line, nothing partial, and once the disk is fixed the same command ends
byte-identical to a clean build.

The output lives on a small tmpfs mounted for the test (the tests run as
root; elsewhere they are skipped), and the build is the real CLI in a
subprocess, with its own local Ray.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from alexpipe.sample import SampleConfig, write_sample
from shards.atomic import is_temporary, write_text_atomic

ALEXPIPE = [sys.executable, "-m", "alexpipe.cli"]
SAMPLE = dict(classes=3, train_per_class=8, val_per_class=3, image_scale=0.3)
OPTIONS = ["--workers", "1", "--shard-size", "2", "--max-rejected", "1", "--no-progress"]
# Small enough that the build's per-shard statistics (in _work/) fill it after
# a few shards, large enough that some shards finish first.
FULL_DISK_SIZE = "6m"
ROOMY_SIZE = "256m"


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``directory`` for the block (unmounted after)."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "alexpipe-test", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def remount(directory: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(directory)], check=True)


def build(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ALEXPIPE, "build-shards", "--src", str(src), "--out", str(out), *OPTIONS],
        capture_output=True,
        text=True,
        timeout=300,
    )


def hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (records in _work/ hold timings, so not those)."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not (path.parent.name == "_work" and path.suffix == ".json")
    }


def read_only_line(out: Path, disk: Path) -> str:
    return (
        f"alexpipe: error: --out {out} is not writable (read-only filesystem on {disk}); "
        "make it writable and rerun the same command, or choose another --out\n"
    )


def refused(src: Path, out: Path, line: str) -> None:
    """The build into ``out`` fails with exactly the one line ``line``."""
    failed = build(src, out)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr == line


def rebuilt(src: Path, out: Path, reference: dict[str, str]):
    """The same command again finishes byte-identical to the clean build, with no
    temporaries left; returns its result."""
    rerun = build(src, out)
    assert rerun.returncode == 0, rerun.stderr
    assert hashes(out) == reference
    assert temporaries(out) == [] and not (out / "_work").exists()
    return rerun


def temporaries(directory: Path) -> list[str]:
    return [path.name for path in directory.rglob("*") if is_temporary(path)]


@pytest.fixture(scope="module")
def source_and_reference(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A sample and the hashes of its clean build (made on an ordinary disk)."""
    root = tmp_path_factory.mktemp("disk")
    sample = write_sample(SampleConfig(out=root / "src", layout="tars", **SAMPLE))
    clean = build(sample.out, root / "clean")
    assert clean.returncode == 0, clean.stderr
    return sample.out, hashes(root / "clean")


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_is_identical(
    source_and_reference, tmp_path
):
    src, reference = source_and_reference
    with tmpfs(tmp_path / "disk", FULL_DISK_SIZE) as disk:
        out = disk / "shards"
        full = (
            f"alexpipe: error: the disk is full: no space left on {disk} for --out {out}; "
            "free some space and rerun the same command (finished shards are kept)\n"
        )
        refused(src, out, full)
        assert not (out / "manifest.json").exists()
        assert temporaries(out) == []
        # Whatever is under a final name is complete: equal to the clean build's file.
        kept = {name: digest for name, digest in hashes(out).items() if "/" not in name}
        assert kept, "the disk filled before any shard was written: FULL_DISK_SIZE too small"
        for name, digest in kept.items():
            assert digest == reference[name], f"{name} is partial under its final name"

        # Space freed, but the disk read-only for a while: refused, nothing changed.
        remount(disk, f"ro,size={ROOMY_SIZE}")
        before = hashes(out)
        refused(src, out, read_only_line(out, disk))
        assert hashes(out) == before

        remount(disk, "rw")
        rerun = rebuilt(src, out, reference)
        assert "0 shards kept from an earlier run" not in rerun.stdout, rerun.stdout


@pytest.mark.slow
def test_a_read_only_out_is_one_line_and_the_rerun_once_writable_is_identical(
    source_and_reference, tmp_path
):
    src, reference = source_and_reference
    with tmpfs(tmp_path / "disk", ROOMY_SIZE) as disk:
        out = disk / "shards"
        remount(disk, "ro")
        refused(src, out, read_only_line(out, disk))
        assert not out.exists()

        remount(disk, "rw")
        rebuilt(src, out, reference)


def test_an_atomic_write_on_a_full_disk_leaves_no_temporary(tmp_path):
    # A small write sits in the file's buffer until the flush, which fails;
    # closing the file then fails the same way, and the temporary must still go.
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with open(disk / "filler", "wb") as filler, pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        with pytest.raises(OSError) as raised:
            write_text_atomic(disk / "manifest.json", "{}\n")
        assert raised.value.errno == errno.ENOSPC
        assert sorted(path.name for path in disk.iterdir()) == ["filler"]
