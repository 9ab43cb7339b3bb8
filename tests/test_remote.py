"""Shards from http://, pipe: and s3:// locations, staged through a bounded, verified cache.

A real ``http.server`` on 127.0.0.1 serves a directory of real shards; the
cache is smaller than the dataset, so staging a whole epoch has to evict.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy
import pytest
from PIL import Image

from shards.atomic import is_temporary
from shards.cache import ShardCache
from shards.errors import UserError
from shards.index import parse_index
from shards.manifest import ClassInfo, Manifest, SplitEntry, write_json_atomic, write_manifest
from shards.reader import iter_shard, sha256_of_file
from shards.remote import (
    HttpSource,
    LocalSource,
    open_source,
    read_index,
    read_manifest,
    read_mean,
    read_stats,
)
from shards.sizes import parse_size
from shards.verified import ShardVerificationError, open_verified
from shards.writer import ShardSample, write_shard

NUM_TRAIN_SHARDS = 6
SAMPLES_PER_SHARD = 4
NUM_CLASSES = 3


def make_jpeg(seed: int) -> bytes:
    pixels = numpy.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_dataset(directory: Path) -> Manifest:
    """Train and val shards, stats.json, mean.npy and a manifest (SPEC §4); returns the manifest."""
    directory.mkdir(parents=True)
    splits = {}
    for split, count in (("train", NUM_TRAIN_SHARDS), ("val", 1)):
        entries = []
        for shard_index in range(count):
            samples = [
                ShardSample(
                    key=f"{split}_{shard_index}_{position}",
                    jpg=make_jpeg(shard_index * 100 + position),
                    label=(shard_index + position) % NUM_CLASSES,
                    meta={"index": shard_index * SAMPLES_PER_SHARD + position},
                )
                for position in range(SAMPLES_PER_SHARD)
            ]
            entries.append(write_shard(directory / f"{split}-{shard_index:06d}.tar", samples))
        splits[split] = SplitEntry(count * SAMPLES_PER_SHARD, 0, tuple(entries))
    stats = {
        "num_images": 24,
        "num_pixels": 24 * 256 * 256,
        "mean_rgb": [120.0, 115.0, 100.0],
        "std_rgb": [60.0, 58.0, 57.0],
        "cov_rgb": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "eigvals": [3.0, 2.0, 1.0],
        "eigvecs": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "scale": "0-255",
    }
    write_json_atomic(directory / "stats.json", stats)
    mean = numpy.arange(256 * 256 * 3, dtype=numpy.float32).reshape(256, 256, 3) % 255
    numpy.save(directory / "mean.npy", mean)
    manifest = Manifest(
        config={
            "size": 16,
            "quality": 90,
            "resize": "center-crop",
            "shard_size": 4,
            "seed": 0,
            "layout": "folder",
        },
        classes=tuple(ClassInfo(k, f"n{k:08d}", "") for k in range(NUM_CLASSES)),
        splits=splits,
    )
    write_manifest(directory, manifest)
    return manifest


class QuietHandler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """(base URL, served directory, manifest, list of requested paths)."""
    directory = tmp_path / "served" / "shards"
    manifest = build_dataset(directory)
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (QuietHandler,), {"requests": requests}), directory=str(tmp_path / "served")
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/shards", directory, manifest, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dataset_bytes(directory: Path, manifest: Manifest, split: str = "train") -> int:
    return sum(
        info.bytes + (directory / info.file).with_suffix(".idx").stat().st_size
        for info in manifest.split(split).shards
    )


def expected_samples(directory: Path, name: str) -> list[tuple[str, bytes, bytes]]:
    return [(key, parts["jpg"], parts["cls"]) for key, parts in iter_shard(directory / name)]


class DiskWatcher:
    """Samples the bytes on disk in a directory (temporaries included) until stopped."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.largest = max(self.largest, self.measure())
            time.sleep(0.0005)

    def measure(self) -> int:
        total = 0
        for path in list(self.directory.iterdir()) if self.directory.exists() else []:
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.largest, self.measure())


def shard_files_named(cache_dir: Path, name: str) -> list[str]:
    """Files in the cache belonging to shard ``name``, final or temporary."""
    stem = name.removesuffix(".tar")
    return sorted(p.name for p in cache_dir.iterdir() if p.name.lstrip(".").startswith(stem))


def test_half_size_cache_stages_every_shard_verified_and_stays_bounded(served, tmp_path):
    url, directory, manifest, requests = served
    source = open_source(url)
    assert not isinstance(source, LocalSource) and isinstance(open_source(directory), LocalSource)
    assert read_manifest(source) == manifest
    limit = dataset_bytes(directory, manifest) // 2
    cache_dir = tmp_path / "cache"
    names = [info.file for info in manifest.split("train").shards]
    order = [names[k] for k in numpy.random.default_rng(7).permutation(len(names))]
    watcher = DiskWatcher(cache_dir)
    seen = []
    with ShardCache(source, manifest, cache_dir, limit) as cache:
        cache.prefetch(order)
        previous = None
        for name in order:
            path = cache.acquire(name)
            # Two shards held at once, as a shuffle window spanning shards does.
            if previous is not None:
                cache.release(previous)
            previous = name
            assert sha256_of_file(path) == cache.info(name).sha256
            assert path.with_suffix(".idx").read_text() == read_index(LocalSource(directory), name)
            samples = [(key, parts["jpg"], parts["cls"]) for key, parts in iter_shard(path)]
            assert samples == expected_samples(directory, name)
            seen += [key for key, _, _ in samples]
            assert cache.stats().bytes_used <= limit
        cache.release(previous)
        stats = cache.stats()
    largest_on_disk = watcher.stop()
    assert sorted(seen) == sorted(
        f"train_{shard}_{position}"
        for shard in range(NUM_TRAIN_SHARDS)
        for position in range(SAMPLES_PER_SHARD)
    )
    assert largest_on_disk <= limit
    assert stats.downloads == NUM_TRAIN_SHARDS and stats.evictions >= NUM_TRAIN_SHARDS // 2
    # Every shard crossed the network exactly once (no prefetched shard was thrown away).
    tar_requests = sorted(path for path in requests if path.endswith(".tar"))
    assert tar_requests == sorted(f"/shards/{name}" for name in names)
    assert not [p for p in cache_dir.iterdir() if is_temporary(p)]

    # A second run over the same cache directory reuses what is there.
    requests.clear()
    with ShardCache(source, manifest, cache_dir, limit) as cache:
        kept = [name for name in order if cache.path_of(name).exists()]
        assert kept and cache.stats().bytes_used <= limit
        for name in kept:
            cache.acquire(name)
            cache.release(name)
        assert cache.stats().downloads == 0
    assert not [path for path in requests if path.endswith(".tar")]


def flip_byte_in_jpeg(directory: Path, name: str) -> None:
    """Corrupt one byte of the first JPEG (the tar stays a valid tar)."""
    first = parse_index((directory / name).with_suffix(".idx").read_text())[0]
    jpg = next(component for component in first.components if component.ext == "jpg")
    path = directory / name
    data = bytearray(path.read_bytes())
    data[jpg.offset + jpg.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", ["flipped-byte", "truncated"])
def test_corrupt_remote_shard_is_detected_and_never_cached(served, tmp_path, corruption):
    url, directory, manifest, _requests = served
    bad, good = "train-000002.tar", "train-000003.tar"
    if corruption == "flipped-byte":
        flip_byte_in_jpeg(directory, bad)
        expected = "sha256"
    else:
        path = directory / bad
        path.write_bytes(path.read_bytes()[:-1024])
        expected = "ended after"
    source = open_source(url)
    cache_dir = tmp_path / "cache"
    with ShardCache(source, manifest, cache_dir, dataset_bytes(directory, manifest)) as cache:
        # On demand.
        with pytest.raises(ShardVerificationError, match=rf"train-000002\.tar.*{expected}"):
            cache.acquire(bad)
        assert shard_files_named(cache_dir, bad) == []
        # Through the prefetcher: the good shard arrives, the bad one is reported, not used.
        cache.prefetch([bad, good])
        assert sha256_of_file(cache.acquire(good)) == cache.info(good).sha256
        cache.release(good)
        with pytest.raises(ShardVerificationError, match=expected):
            cache.acquire(bad)
        assert shard_files_named(cache_dir, bad) == []
        # Streaming without the cache: the mismatch surfaces at the end of the stream.
        with open_verified(source, cache.info(bad)) as stream:
            with pytest.raises(ShardVerificationError, match=expected):
                stream.finish()
            assert not stream.verified
        assert cache.stats().bytes_used == cache.info(good).bytes + len(read_index(source, good))


def test_stale_index_is_detected(served, tmp_path):
    url, directory, manifest, _requests = served
    index_path = directory / "train-000001.idx"
    lines = index_path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # samples listed in the wrong order
    index_path.write_text("\n".join(lines) + "\n")
    with ShardCache(open_source(url), manifest, tmp_path / "cache", 10**9) as cache:
        with pytest.raises(ShardVerificationError, match=r"train-000001\.tar: its index"):
            cache.acquire("train-000001.tar")
        assert shard_files_named(tmp_path / "cache", "train-000001.tar") == []


def test_open_verified_reads_a_shard_as_a_tar_stream(served):
    url, directory, manifest, _requests = served
    info = manifest.split("val").shards[0]
    assert info.file == "val-000000.tar"
    with open_verified(open_source(url), info) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            names = [member.name for member in archive]
        stream.finish()
        assert stream.verified
    extensions = ("cls", "jpg", "json")
    assert names == [f"val_0_{k}.{ext}" for k in range(SAMPLES_PER_SHARD) for ext in extensions]


def test_metadata_over_http_matches_local(served):
    url, directory, manifest, _requests = served
    remote, local = open_source(url + "/"), open_source(str(directory))
    assert read_stats(remote, manifest) == read_stats(local, read_manifest(local))
    assert numpy.array_equal(read_mean(remote, manifest), numpy.load(directory / "mean.npy"))
    assert read_index(remote, "val-000000.tar") == (directory / "val-000000.idx").read_text()


def test_pipe_source_stages_with_cat(served, tmp_path):
    _url, directory, manifest, _requests = served
    source = open_source(f"pipe:cat {directory}/{{file}}")
    assert read_manifest(source) == manifest
    limit = dataset_bytes(directory, manifest) // 2
    names = [info.file for info in manifest.split("train").shards]
    with ShardCache(source, manifest, tmp_path / "cache", limit) as cache:
        cache.prefetch(names)
        for name in names:
            path = cache.acquire(name)
            served_digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
            assert sha256_of_file(path) == served_digest
            cache.release(name)
        assert cache.stats().downloads == len(names)
    with pytest.raises(UserError, match=r"not a complete alexpipe shard directory.*status 1"):
        read_manifest(open_source(f"pipe:cat {tmp_path}/nowhere/{{file}}"))
    with pytest.raises(UserError, match=r"needs \{file\}"):
        open_source(f"pipe:cat {directory}/manifest.json")


def test_missing_remote_files_are_clear_user_errors(served, tmp_path):
    url, directory, manifest, _requests = served
    with pytest.raises(UserError, match=r"not a complete alexpipe shard directory.*HTTP 404"):
        read_manifest(open_source(url + "/no-such-dir/"))
    # Nothing listens on port 1 of the loopback interface.
    with pytest.raises(UserError, match=r"cannot fetch http://127\.0\.0\.1:1/s/manifest\.json"):
        read_manifest(HttpSource("http://127.0.0.1:1/s", retries=0))
    (directory / "train-000004.tar").unlink()
    with ShardCache(open_source(url), manifest, tmp_path / "cache", 10**9) as cache:
        with pytest.raises(UserError, match=r"/shards/train-000004\.tar: not found \(HTTP 404\)"):
            cache.acquire("train-000004.tar")
        with pytest.raises(UserError, match="not in the manifest"):
            cache.acquire("train-999999.tar")


def test_s3_without_boto3_says_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an absent package looks like
    with pytest.raises(UserError, match=r"needs boto3.*pip install boto3"):
        open_source("s3://bucket/imagenet/shards")


def test_location_checks(served, tmp_path):
    _url, directory, manifest, _requests = served
    with pytest.raises(UserError, match="unsupported shard location scheme 'ftp'"):
        open_source("ftp://host/shards")
    assert isinstance(open_source(f"file://{directory}"), LocalSource)
    # Shard names come from a possibly remote manifest and end up in shell commands.
    hostile = tmp_path / "hostile"
    shutil.copytree(directory, hostile)
    document = manifest.as_json()
    document["splits"]["train"]["shards"][0]["file"] = "x;rm -rf ~;.tar"
    write_json_atomic(hostile / "manifest.json", document)
    with pytest.raises(UserError, match="not a plain file name"):
        read_manifest(open_source(f"pipe:cat {hostile}/{{file}}"))


def test_local_source_needs_no_copy_and_cache_limits_are_checked(served, tmp_path):
    _url, directory, manifest, _requests = served
    local = open_source(str(directory))
    with ShardCache(local, manifest, tmp_path / "unused", 0) as cache:
        assert cache.acquire("train-000000.tar") == directory / "train-000000.tar"
        cache.release("train-000000.tar")
    assert not (tmp_path / "unused").exists()
    remote = open_source(f"pipe:cat {directory}/{{file}}")
    largest = max(info.bytes for info in manifest.split("train").shards)
    with pytest.raises(UserError, match="too small.*--cache-size"):
        ShardCache(remote, manifest, tmp_path / "cache", largest)
    with ShardCache(remote, manifest, tmp_path / "cache", 10**9):
        with pytest.raises(UserError, match="in use by another process"):
            ShardCache(remote, manifest, tmp_path / "cache", 10**9)


def test_parse_size():
    assert parse_size("1000") == 1000
    assert parse_size("500M") == 500 * 2**20
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("20GB") == 20 * 10**9
    with pytest.raises(UserError, match="cannot read size"):
        parse_size("lots")


def test_no_stray_processes_from_pipe_streams(served):
    _url, directory, manifest, _requests = served
    source = open_source(f"pipe:cat {directory}/{{file}}")
    stream = source.open("train-000000.tar")
    stream.read(10)
    stream.close()  # stopped early: the command is ended, not left running
    assert stream._process.returncode is not None
    assert os.path.exists(directory / "train-000000.tar")
