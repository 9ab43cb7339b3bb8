"""verify's one pass over each shard: the same findings as reading the tar with tarfile,
from one read; the damaged sample named; every core used; the benchmark tool runs."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy
import pytest
from test_shards import build_directory

from shards.index import build_index, index_text
from shards.reader import iter_members, iter_shard, sha256_of_file
from shards.scan import CHUNK_SIZE, scan_shard
from shards.verify import verify_directory, verify_shards
from shards.writer import ShardSample, write_shard

ROOT = Path(__file__).resolve().parent.parent


def _photo_jpeg(seed: int) -> bytes:
    """A 256x256 JPEG of a real photograph (entropy-coded data like a camera's)."""

    from alexpipe.sample.photos import load_photos, render_photo

    rng = numpy.random.default_rng(seed)
    image = render_photo(load_photos()[seed % 3], (256, 256), rng)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_scan_reads_once_and_finds_what_tarfile_finds(tmp_path):
    # Members larger than a read chunk, and many small ones across chunk edges.
    samples = [
        ShardSample(f"k{index:03d}", bytes([index]) * size, index % 3, {"index": index})
        for index, size in enumerate([3, CHUNK_SIZE + 700, 1, 511, 512, 513, 2 * CHUNK_SIZE, 9])
    ]
    path = tmp_path / "train-000000.tar"
    info = write_shard(path, samples)
    handed = []
    scan = scan_shard(path, ("cls", "jpg", "json"), lambda key, parts: handed.append((key, parts)))
    assert (scan.bytes_read, scan.sha256) == (info.bytes, info.sha256)
    assert scan.sha256 == sha256_of_file(path)
    assert scan.members == [member.as_tuple() for member in iter_members(path)]
    assert handed == list(iter_shard(path))
    assert scan.member_error is None and scan.sample_error is None
    assert index_text(scan.index_lines) == build_index(scan.members)
    assert index_text(scan.index_lines) == path.with_suffix(".idx").read_text()
    # Parts not asked for are present but not read into memory.
    scan = scan_shard(path, ("cls",), lambda key, parts: handed.append(parts))
    assert handed[-1] == {"cls": b"1", "jpg": None, "json": None}


def test_verify_in_processes_equals_verify_in_one(tmp_path):
    directory = tmp_path / "shards"
    build_directory(directory)
    (directory / "train-000000.idx").unlink()
    seen = []
    report = verify_directory(directory, progress=seen.append, workers=2)
    assert report.problems == verify_shards(directory, workers=1)
    assert report.problems == ["train-000000.idx: index file missing"]
    assert report.failing_shards == ["train-000000.tar"]
    assert seen == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert report.shard_keys["val-000000.tar"] == ["va_00100", "va_00101", "va_00102"]


def test_a_header_with_a_bad_checksum_is_named_with_its_place(tmp_path):
    directory = tmp_path / "shards"
    build_directory(directory)
    path = directory / "val-000000.tar"
    second = list(iter_members(path))[3]  # the second sample's first header
    data = bytearray(path.read_bytes())
    data[second.header_offset + 20] ^= 0x01  # inside its name
    path.write_bytes(bytes(data))
    problems = verify_shards(directory)
    assert problems[1:] == [
        f"val-000000.tar: corrupt tar (bad header checksum at byte {second.header_offset})",
        "val: 0 samples in the shards, manifest says 3",
    ]


def test_bit_rot_in_a_jpeg_is_named_by_shard_and_key(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    samples = [ShardSample(f"photo_{i}", _photo_jpeg(i), i % 3, {"index": i}) for i in range(4)]
    info = write_shard(directory / "val-000000.tar", samples)
    manifest = {  # val only: no statistics expected
        "format": "alexpipe-shards/1",
        "config": {"size": 256},
        "classes": [{"index": i, "wnid": f"n{i:08d}", "name": ""} for i in range(3)],
        "splits": {"val": {"num_samples": 4, "num_rejected": 0, "shards": [vars(info)]}},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(directory, decode=True) == []

    path = directory / "val-000000.tar"
    jpg = [m for m in iter_members(path) if m.name == "photo_2.jpg"][0]
    data = bytearray(path.read_bytes())
    middle = jpg.data_offset + jpg.size // 2
    garbage = numpy.random.default_rng(0).integers(0, 256, 2048, dtype=numpy.uint8)
    data[middle - 1024 : middle + 1024] = garbage.tobytes()  # same size: bit rot
    path.write_bytes(bytes(data))

    problems = verify_shards(directory)
    assert len(problems) == 1
    assert problems[0].startswith("val-000000.tar: sha256 mismatch (expected ")
    assert "; sample photo_2.jpg does not decode (" in problems[0]
    decoded = verify_shards(directory, decode=True)
    assert decoded[0].startswith("val-000000.tar: sha256 mismatch") and "photo_2" not in decoded[0]
    assert decoded[1].startswith("val-000000.tar: sample photo_2.jpg does not decode (")
    assert len(decoded) == 2

    result = subprocess.run(
        [sys.executable, "-m", "alexpipe.cli", "verify", str(directory), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("FAIL val-000000.tar: sha256 mismatch") and "photo_2.jpg" in lines[0]
    assert lines[-1] == (
        f"alexpipe: error: 1 problem(s) in {directory}; to rebuild the failing shards: "
        f"alexpipe verify {directory} --repair --src SRC"
    )


def test_links_and_long_names_are_refused_in_one_line(tmp_path):
    directory = tmp_path / "shards"
    build_directory(directory)
    path = directory / "val-000000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        link = tarfile.TarInfo("va_00100.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    problems = verify_shards(directory)
    assert "val-000000.tar: member 'va_00100.jpg' is a link to '/etc/passwd'; refusing it" in (
        problems
    )
    # A GNU long name (write_shard never makes one) is refused, not followed.
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(tarfile.TarInfo("x" * 120 + ".jpg"), io.BytesIO(b""))
    assert "val-000000.tar: member '././@LongLink' has unsupported type b'L'; refusing it" in (
        verify_shards(directory)
    )


def test_verify_repair_needs_src_and_src_needs_repair(tmp_path):
    directory = tmp_path / "shards"
    build_directory(directory)
    for arguments in (["--repair"], ["--src", str(tmp_path)]):
        result = subprocess.run(
            [sys.executable, "-m", "alexpipe.cli", "verify", str(directory), *arguments],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "alexpipe: error: --repair and --src SRC go together: "
            "alexpipe verify DIR --repair --src SRC"
        )


@pytest.mark.slow
def test_bench_verify_compares_verify_with_hashlib(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "tools/bench_verify.py",
            "--images",
            "60",
            "--shard-size",
            "20",
            "--workers",
            "2",
            "--repeats",
            "1",
            "--work",
            str(tmp_path),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["shards"] == 4 and report["set_bytes"] > 0
    assert report["verify_mb_per_s"] > 0 and report["hashlib_mb_per_s"] > 0
    shutil.rmtree(tmp_path, ignore_errors=True)
