"""Tests of the shard format: writer, index, reader, manifest, verify, atomic writes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy
import pytest
from PIL import Image

from shards.atomic import is_temporary, remove_temporaries, temporary_path
from shards.errors import UserError
from shards.index import IndexFormatError, build_index, parse_index
from shards.manifest import (
    FORMAT,
    ClassInfo,
    Manifest,
    SplitEntry,
    index_name,
    parse_manifest,
    shard_name,
    write_json_atomic,
    write_manifest,
)
from shards.reader import (
    ShardFormatError,
    decode_label,
    iter_members,
    iter_shard,
    sha256_of_file,
)
from shards.remote import LocalSource, read_manifest, read_stats
from shards.verify import verify_shards
from shards.writer import ShardInfo, ShardSample, write_shard

SIZE = 256
NUM_CLASSES = 3


def make_jpeg(seed: int, size: int = SIZE) -> bytes:
    """A small baseline RGB JPEG whose content depends on ``seed``."""
    generator = numpy.random.default_rng(seed)
    pixels = generator.integers(0, 256, size=(8, 8, 3), dtype=numpy.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_samples(prefix: str, count: int, start: int = 0) -> list[ShardSample]:
    return [
        ShardSample(
            key=f"{prefix}_{start + position:05d}",
            jpg=make_jpeg(start + position),
            label=(start + position) % NUM_CLASSES,
            meta={"index": start + position, "wnid": f"n{position:08d}", "repairs": []},
        )
        for position in range(count)
    ]


def read_shard_info(tar_path: Path) -> ShardInfo:
    """A shard's record read back from disk: size and sha256 of the tar, samples of its index."""
    samples = parse_index(tar_path.with_suffix(".idx").read_text(encoding="ascii"))
    return ShardInfo(tar_path.name, len(samples), tar_path.stat().st_size, sha256_of_file(tar_path))


def build_directory(directory: Path) -> Manifest:
    """A complete little shard directory: 2 train shards, 1 val shard, manifest, stats, mean."""
    directory.mkdir(parents=True, exist_ok=True)
    layout = {"train": [make_samples("tr", 4), make_samples("tr", 3, start=4)]}
    layout["val"] = [make_samples("va", 3, start=100)]
    splits = {}
    for split, shard_samples in layout.items():
        infos = [
            write_shard(directory / shard_name(split, shard_index), samples)
            for shard_index, samples in enumerate(shard_samples)
        ]
        splits[split] = SplitEntry(sum(info.num_samples for info in infos), 0, tuple(infos))
    stats = {
        "num_images": 7,
        "num_pixels": 7 * SIZE * SIZE,
        "mean_rgb": [1.0, 2.0, 3.0],
        "std_rgb": [1.0, 1.0, 1.0],
        "cov_rgb": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "eigvals": [1.0, 1.0, 1.0],
        "eigvecs": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "scale": "0-255",
    }
    write_json_atomic(directory / "stats.json", stats)
    numpy.save(directory / "mean.npy", numpy.zeros((SIZE, SIZE, 3), numpy.float32))
    manifest = Manifest(
        config={"size": SIZE, "quality": 90, "resize": "center-crop", "shard_size": 4},
        classes=tuple(ClassInfo(i, f"n{i:08d}", f"c{i}") for i in range(3)),
        splits=splits,
    )
    write_manifest(directory, manifest)
    return manifest


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    directory = tmp_path / "shards"
    build_directory(directory)
    return directory


# --- writer -------------------------------------------------------------------------------


def test_write_shard_is_byte_reproducible_and_hashes_while_writing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_shard(tmp_path / "a" / "train-000000.tar", iter(make_samples("k", 5)))
    second = write_shard(tmp_path / "b" / "train-000000.tar", make_samples("k", 5))
    first_bytes = (tmp_path / "a" / "train-000000.tar").read_bytes()
    assert first_bytes == (tmp_path / "b" / "train-000000.tar").read_bytes()
    assert (tmp_path / "a" / "train-000000.idx").read_bytes() == (
        tmp_path / "b" / "train-000000.idx"
    ).read_bytes()
    assert first == second
    assert read_shard_info(tmp_path / "a" / "train-000000.tar") == first
    assert first.file == "train-000000.tar"
    assert first.num_samples == 5
    assert first.bytes == len(first_bytes)
    assert first.sha256 == hashlib.sha256(first_bytes).hexdigest()
    assert len(first_bytes) % tarfile.RECORDSIZE == 0
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == [
        "train-000000.idx",
        "train-000000.tar",
    ]


def test_tar_members_have_fixed_ustar_headers(tmp_path):
    samples = make_samples("n01440764", 2)
    write_shard(tmp_path / "s.tar", samples)
    data = (tmp_path / "s.tar").read_bytes()
    assert data[257:265] == b"ustar\x0000"  # POSIX USTAR magic + version
    with tarfile.open(tmp_path / "s.tar") as archive:
        members = archive.getmembers()
    assert [member.name for member in members] == [
        "n01440764_00000.cls",
        "n01440764_00000.jpg",
        "n01440764_00000.json",
        "n01440764_00001.cls",
        "n01440764_00001.jpg",
        "n01440764_00001.json",
    ]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
        assert (member.uname, member.gname, member.type) == ("", "", tarfile.REGTYPE)


@pytest.mark.parametrize("key", ["a.b", "../x", "a/b", "a b", "", "-x", "é", "x" * 96])
def test_unsafe_keys_are_rejected_and_leave_nothing(tmp_path, key):
    with pytest.raises(ValueError, match="not a safe name"):
        write_shard(tmp_path / "s.tar", [ShardSample(key, b"\xff\xd8", 0, {})])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "samples, message",
    [
        ([ShardSample("a", b"x", 0, {}), ShardSample("a", b"y", 1, {})], "duplicate sample key"),
        ([ShardSample("a", b"x", -1, {})], "non-negative int"),
        ([ShardSample("a", b"x", True, {})], "non-negative int"),
        ([ShardSample("a", b"", 0, {})], "jpg is empty"),
        ([], "at least one sample"),
    ],
)
def test_invalid_samples_are_rejected_and_leave_nothing(tmp_path, samples, message):
    with pytest.raises(ValueError, match=message):
        write_shard(tmp_path / "s.tar", samples)
    assert list(tmp_path.iterdir()) == []


# --- reader -------------------------------------------------------------------------------


def test_iter_shard_round_trips_every_byte(tmp_path):
    samples = make_samples("ILSVRC2012_val", 4)
    write_shard(tmp_path / "val-000000.tar", samples)
    read = list(iter_shard(tmp_path / "val-000000.tar"))
    assert [key for key, _ in read] == [sample.key for sample in samples]
    for (_, parts), sample in zip(read, samples, strict=True):
        assert parts["jpg"] == sample.jpg
        assert decode_label(parts["cls"]) == sample.label
        assert parts["cls"] == str(sample.label).encode()
        assert json.loads(parts["json"]) == sample.meta
        # Canonical JSON: sorted keys, no spaces.
        assert (
            parts["json"] == json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode()
        )


def _tar_with(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return path


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, int(kind == tarfile.REGTYPE), link
    return info


@pytest.mark.parametrize(
    "member, reason",
    [
        (_info("a.jpg", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
        (_info("a.jpg", tarfile.LNKTYPE, link="b.jpg"), "is a link"),
        (_info("a.jpg", tarfile.CHRTYPE), "device"),
        (_info("a.jpg", tarfile.FIFOTYPE), "device"),
        (_info("../a.jpg"), "unsafe path"),
        (_info("/abs/a.jpg"), "unsafe path"),
    ],
)
def test_reader_refuses_unsafe_members(tmp_path, member, reason):
    path = _tar_with(tmp_path / "bad.tar", _info("ok.cls"), member)
    with pytest.raises(ShardFormatError, match=reason):
        list(iter_shard(path))
    with pytest.raises(ShardFormatError, match=reason):
        list(iter_members(path))


def test_reader_refuses_repeated_key_and_detects_truncation_at_member_boundary(tmp_path):
    path = _tar_with(tmp_path / "dup.tar", _info("a.cls"), _info("b.cls"), _info("a.jpg"))
    with pytest.raises(ShardFormatError, match="appears twice"):
        list(iter_shard(path))
    write_shard(tmp_path / "s.tar", make_samples("k", 2))
    members = list(iter_members(tmp_path / "s.tar"))
    boundary = members[3].header_offset  # start of the second sample
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[:boundary])
    with pytest.raises(ShardFormatError, match="truncated"):
        list(iter_shard(tmp_path / "s.tar"))


# --- index --------------------------------------------------------------------------------


def test_build_index_format_and_parse_round_trip():
    members = [
        ("a.cls", 0, 512, 1),
        ("a.jpg", 1024, 1536, 700),
        ("b.cls", 2560, 3072, 2),
    ]
    text = build_index(members)
    assert text == "v1.2 2\ncls 512 1 a.cls jpg 1536 700 a.jpg\ncls 3072 2 b.cls\n"
    parsed = parse_index(text)
    assert [sample.key for sample in parsed] == ["a", "b"]
    assert [(c.ext, c.offset, c.size) for c in parsed[0].components] == [
        ("cls", 512, 1),
        ("jpg", 1536, 700),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v1.1 1\ncls 512 1 a.cls\n",
        "v1.2 2\ncls 512 1 a.cls\n",
        "v1.2 0\n",
        "v1.2 1\ncls 513 1 a.cls\n",
        "v1.2 1\ncls 512 1\n",
        "v1.2 1\njpg 512 1 a.cls\n",
        "v1.2 1\ncls 512 1 a.cls cls 1024 1 b.cls\n",
    ],
)
def test_parse_index_rejects_malformed_text(text):
    with pytest.raises(IndexFormatError):
        parse_index(text)


def test_index_equals_dalis_own_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # shipped with nvidia-dali
    write_shard(tmp_path / "s.tar", make_samples("k", 3))
    with wds2idx.IndexCreator(str(tmp_path / "s.tar"), str(tmp_path / "dali.idx"), False) as ic:
        ic.create_index()
    assert (tmp_path / "dali.idx").read_text() == (tmp_path / "s.idx").read_text()


def _dali_read(tar_path: Path, index_path: Path, count: int) -> list[list[bytes]]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=count, num_threads=1, device_id=None)
    def read_pipeline():
        jpg, cls, meta = fn.readers.webdataset(
            paths=[str(tar_path)],
            index_paths=[str(index_path)],
            ext=["jpg", "cls", "json"],
            random_shuffle=False,
            name="reader",
        )
        return jpg, cls, meta

    pipeline = read_pipeline()
    pipeline.build()
    outputs = pipeline.run()
    return [[bytes(numpy.asarray(output.at(i))) for output in outputs] for i in range(count)]


def test_dali_reader_with_our_index_returns_exactly_the_written_bytes(tmp_path):
    pytest.importorskip("nvidia.dali")
    samples = make_samples("n01440764", 4)
    write_shard(tmp_path / "train-000000.tar", samples)
    read = _dali_read(tmp_path / "train-000000.tar", tmp_path / "train-000000.idx", 4)
    for (jpg, cls, meta), sample in zip(read, samples, strict=True):
        assert jpg == sample.jpg
        assert int(cls) == sample.label
        assert json.loads(meta) == sample.meta
    # DALI really reads through the index (not a scan of the tar): shorten one
    # recorded size and that component comes back shorter by exactly that much.
    index_text = (tmp_path / "train-000000.idx").read_text()
    first_jpg = parse_index(index_text)[0].components[1]
    edited = index_text.replace(
        f"jpg {first_jpg.offset} {first_jpg.size} ", f"jpg {first_jpg.offset} 10 ", 1
    )
    (tmp_path / "edited.idx").write_text(edited)
    assert (
        _dali_read(tmp_path / "train-000000.tar", tmp_path / "edited.idx", 4)[0][0]
        == (samples[0].jpg[:10])
    )


# --- atomicity ----------------------------------------------------------------------------


def test_generator_failing_midway_leaves_no_final_file_and_keeps_old_shard(tmp_path):
    def failing():
        yield from make_samples("k", 2)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        write_shard(tmp_path / "train-000000.tar", failing())
    assert list(tmp_path.iterdir()) == []

    write_shard(tmp_path / "train-000000.tar", make_samples("k", 2))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="worker died"):
        write_shard(tmp_path / "train-000000.tar", failing())
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_no_final_name_until_complete_even_when_the_process_is_killed(tmp_path):
    # A real crash: the process exits mid-shard (no exception handling runs).
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pathlib import Path
from shards.writer import ShardSample, write_shard
def samples():
    for i in range(3):
        yield ShardSample(f"k{{i}}", b"\\xff" * 5000, 0, {{}})
    assert not Path({str(tmp_path / "train-000000.tar")!r}).exists()
    assert not Path({str(tmp_path / "train-000000.idx")!r}).exists()
    os._exit(17)
write_shard(Path({str(tmp_path / "train-000000.tar")!r}), samples())
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert completed.returncode == 17, completed.stderr.decode()
    left = sorted(path.name for path in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith(".train-000000.tar.tmp-")
    assert is_temporary(tmp_path / left[0])
    assert remove_temporaries(tmp_path) == [tmp_path / left[0]]
    assert list(tmp_path.iterdir()) == []


def test_leftover_temporaries_are_never_picked_up(shard_dir):
    stale = temporary_path(shard_dir / "train-000000.tar")
    stale.write_bytes(b"partial")
    (shard_dir / ".train-000001.idx.tmp-1-00").write_bytes(b"v1.2 1\n")
    assert verify_shards(shard_dir) == []
    assert [info.file for info in read_manifest(shard_dir).split("train").shards] == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert sorted(path.name for path in remove_temporaries(shard_dir)) == sorted(
        [stale.name, ".train-000001.idx.tmp-1-00"]
    )


# --- manifest -----------------------------------------------------------------------------


def test_manifest_paths_and_stats(shard_dir):
    manifest = read_manifest(shard_dir)
    assert manifest == build_directory(shard_dir.parent / "again")
    assert manifest.split("train").num_samples == 7 and manifest.num_classes == 3
    assert [index_name(info.file) for info in manifest.split("val").shards] == ["val-000000.idx"]
    assert read_stats(LocalSource(shard_dir), manifest)["scale"] == "0-255"
    with pytest.raises(UserError, match=r"split 'test' is not in the shards \(available: train"):
        manifest.split("test")
    # Written with a trailing newline, indented, and nothing left beside it.
    assert (shard_dir / "manifest.json").read_text().startswith('{\n  "format"')


def test_manifest_file_layout_is_fixed(tmp_path):
    """The writer renders exactly this text (builds are compared byte for byte)."""
    shard = ShardInfo("train-000000.tar", 2, 10240, "ab" * 32)
    manifest = Manifest(
        config={"size": 256, "layout": "folder", "splits": ["train"]},
        classes=(ClassInfo(0, "n00000001", "tench"),),
        splits={"train": SplitEntry(2, 1, (shard,)), "val": SplitEntry(0, 0, ())},
        stats=None,
        mean=None,
    )
    expected = {
        "format": FORMAT,
        "config": {"size": 256, "layout": "folder", "splits": ["train"]},
        "classes": [{"index": 0, "wnid": "n00000001", "name": "tench"}],
        "splits": {
            "train": {
                "num_samples": 2,
                "num_rejected": 1,
                "shards": [
                    {"file": "train-000000.tar", "num_samples": 2, "bytes": 10240,
                     "sha256": "ab" * 32}
                ],
            },
            "val": {"num_samples": 0, "num_rejected": 0, "shards": []},
        },
        "stats": None,
        "mean": None,
        "rejected": "rejected.jsonl",
    }  # fmt: skip
    text = json.dumps(expected, indent=2, ensure_ascii=True) + "\n"
    write_manifest(tmp_path, manifest)
    assert (tmp_path / "manifest.json").read_text() == text
    assert parse_manifest(text.encode(), "manifest.json") == manifest


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        read_manifest(tmp_path / "file")
    with pytest.raises(UserError, match=r"not a complete alexpipe shard directory.*build-shards"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the manifest"):
        read_manifest(tmp_path)
    write_json_atomic(tmp_path / "manifest.json", {"format": "alexpipe-shards/0", "splits": {}})
    with pytest.raises(UserError, match="'alexpipe-shards/0'"):
        read_manifest(tmp_path)
    write_json_atomic(tmp_path / "manifest.json", {"format": FORMAT, "splits": {"train": {}}})
    with pytest.raises(UserError, match=r"manifest\.json: malformed manifest \(KeyError"):
        read_manifest(tmp_path)
    shard = {"file": "../train-000000.tar", "num_samples": 1, "bytes": 1, "sha256": "0"}
    splits = {"train": {"num_samples": 1, "shards": [shard]}}
    write_json_atomic(tmp_path / "manifest.json", {"format": FORMAT, "splits": splits})
    with pytest.raises(UserError, match="not a plain file name"):
        read_manifest(tmp_path)


# --- verify -------------------------------------------------------------------------------


def test_verify_passes_on_intact_output_with_decode(shard_dir):
    seen = []
    assert verify_shards(shard_dir, decode=True, progress=seen.append) == []
    assert seen == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]


def test_verify_catches_a_flipped_byte(shard_dir):
    path = shard_dir / "train-000001.tar"
    jpg = next(member for member in iter_members(path) if member.name.endswith(".jpg"))
    data = bytearray(path.read_bytes())
    data[jpg.data_offset + jpg.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_shards(shard_dir)
    assert len(problems) == 1
    assert problems[0].startswith("train-000001.tar: sha256 mismatch (expected ")


def test_verify_catches_a_truncated_shard(shard_dir):
    path = shard_dir / "train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert verify_shards(shard_dir) == [
        f"train-000000.tar: size mismatch (expected {len(data)} bytes, got {len(data) // 3})",
        "train-000000.tar: truncated (no end-of-archive marker)",
        "train: 3 samples in the shards, manifest says 7",
    ]


def test_verify_catches_missing_shard_and_missing_index(shard_dir):
    (shard_dir / "train-000001.tar").unlink()
    (shard_dir / "val-000000.idx").unlink()
    problems = verify_shards(shard_dir)
    assert "train-000001.tar: missing" in problems
    assert "train: 4 samples in the shards, manifest says 7" in problems
    assert "val-000000.idx: index file missing" in problems
    assert len(problems) == 3


def test_verify_catches_index_disagreeing_with_tar(shard_dir):
    index_path = shard_dir / "val-000000.idx"
    lines = index_path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    index_path.write_text("\n".join(lines) + "\n")
    assert verify_shards(shard_dir) == [
        "val-000000.idx: does not match val-000000.tar: sample 0 (va_00100) differs from the tar"
    ]


def test_verify_catches_labels_duplicates_extras_and_bad_jpegs(tmp_path):
    directory = tmp_path / "shards"
    manifest = build_directory(directory)
    # A second val shard repeating a key, with a JPEG of the wrong size.
    repeated = make_samples("va", 1, start=100)[0]
    odd = ShardSample("va_00999", make_jpeg(1, size=32), 0, {})
    info = write_shard(directory / "val-000001.tar", [repeated, odd])
    val = manifest.split("val")
    manifest = dataclasses.replace(
        manifest,
        classes=manifest.classes[:2],  # label 2 is now out of range
        splits={**manifest.splits, "val": SplitEntry(val.num_samples + 2, 0, (*val.shards, info))},
    )
    write_manifest(directory, manifest)
    write_shard(directory / "train-000009.tar", make_samples("x", 1))
    problems = verify_shards(directory, decode=True)
    assert "train-000000.tar: sample tr_00002 label 2 outside 0..1" in problems
    assert "val: key va_00100 in both val-000000.tar and val-000001.tar" in problems
    assert "val-000001.tar: sample va_00999.jpg is 32x32, not 256x256" in problems
    assert "train-000009.tar: not listed in the manifest" in problems
    assert "train-000009.idx: not listed in the manifest" in problems


def test_remove_temporaries_keeps_real_files(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    assert remove_temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [".hidden", "train-000000.tar"]
