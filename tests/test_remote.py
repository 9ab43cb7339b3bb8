"""Shards from http:// and pipe: locations, staged through a bounded, verified cache.

A real ``http.server`` on 127.0.0.1 serves a directory of real shards; the
cache is smaller than the dataset, so staging a whole epoch has to evict.
(S3 through a local moto server: ``test_remote_s3.py``.)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import os
import shutil
import subprocess
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
from shards.cache import AHEAD, ShardCache, ShardVerificationError, describe_bytes
from shards.errors import UserError
from shards.index import IndexDigest, build_index, parse_index
from shards.manifest import ClassInfo, Manifest, SplitEntry, write_json_atomic, write_manifest
from shards.reader import iter_members, iter_shard, sha256_of_file
from shards.remote import (
    FsspecSource,
    LocalSource,
    open_source,
    read_index,
    read_manifest,
    read_mean,
    read_stats,
)
from shards.sizes import parse_size
from shards.writer import ShardSample, write_shard

REPO = Path(__file__).resolve().parents[1]

NUM_TRAIN_SHARDS = 6
SAMPLES_PER_SHARD = 4
NUM_CLASSES = 3


def make_jpeg(seed: int) -> bytes:
    pixels = numpy.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_dataset(directory: Path) -> Manifest:
    """Train and val shards, stats.json, mean.npy and a manifest; returns the manifest."""
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


def dataset_bytes(manifest: Manifest, split: str = "train") -> int:
    """What the cache counts of a split: its tars."""
    return sum(info.bytes for info in manifest.split(split).shards)


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
        return disk_bytes(self.directory)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.largest, self.measure())


def shard_files_named(cache_dir: Path, name: str) -> list[str]:
    """Files in the cache belonging to shard ``name``, final or temporary."""
    stem = name.removesuffix(".tar")
    return sorted(p.name for p in cache_dir.iterdir() if p.name.lstrip(".").startswith(stem))


def open_cache(source, infos, directory, max_bytes) -> contextlib.closing[ShardCache]:
    """A cache checking staged shards against the index files at ``source``, as a loader does;
    closed when the ``with`` block ends."""
    indexes = [IndexDigest.of(read_index(source, info.file)) for info in infos]
    return contextlib.closing(ShardCache(source, infos, indexes, directory, max_bytes))


def fetch(cache: ShardCache, number: int) -> Path:
    """Stage shard ``number`` (its first read) and give its path."""
    cache.read(number, 0, 0)
    return cache.paths[number]


def disk_bytes(directory: Path) -> int:
    """Bytes of the files in ``directory`` (temporaries included)."""
    total = 0
    for path in list(directory.iterdir()) if directory.exists() else []:
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def index_of(path: Path) -> str:
    """The index text a tar's members give (what a staged copy is checked against)."""
    return build_index(member.as_tuple() for member in iter_members(path))


def test_half_size_cache_stages_every_shard_verified_and_stays_bounded(served, tmp_path):
    url, directory, manifest, requests = served
    source = open_source(url)
    assert isinstance(source, FsspecSource) and isinstance(open_source(directory), LocalSource)
    assert read_manifest(source) == manifest
    infos = manifest.split("train").shards
    limit = dataset_bytes(manifest) // 2
    cache_dir = tmp_path / "cache"
    order = [int(number) for number in numpy.random.default_rng(7).permutation(len(infos))]
    watcher = DiskWatcher(cache_dir)
    seen = []
    with open_cache(source, infos, cache_dir, limit) as cache:
        cache.prefetch(order)
        for number in order:
            path = fetch(cache, number)
            name = infos[number].file
            assert sha256_of_file(path) == infos[number].sha256
            assert index_of(path) == read_index(LocalSource(directory), name)
            samples = [(key, parts["jpg"], parts["cls"]) for key, parts in iter_shard(path)]
            assert samples == expected_samples(directory, name)
            seen += [key for key, _, _ in samples]
            assert disk_bytes(cache.directory) <= limit
        kept = [number for number in order if cache.paths[number].exists()]
    largest_on_disk = watcher.stop()
    assert sorted(seen) == sorted(
        f"train_{shard}_{position}"
        for shard in range(NUM_TRAIN_SHARDS)
        for position in range(SAMPLES_PER_SHARD)
    )
    assert largest_on_disk <= limit
    assert 0 < len(kept) <= NUM_TRAIN_SHARDS - NUM_TRAIN_SHARDS // 2  # the rest was evicted
    # Every shard crossed the network exactly once (no prefetched shard was thrown away).
    tar_requests = sorted(path for path in requests if path.endswith(".tar"))
    assert tar_requests == sorted(f"/shards/{info.file}" for info in infos)
    assert not [p for p in cache_dir.iterdir() if is_temporary(p)]

    # A second run over the same cache directory reuses what is there.
    requests.clear()
    with open_cache(source, infos, cache_dir, limit) as cache:
        assert disk_bytes(cache.directory) <= limit
        for number in kept:
            assert sha256_of_file(fetch(cache, number)) == infos[number].sha256
    assert not [path for path in requests if path.endswith(".tar")]


def test_eviction_takes_the_least_recently_used_shard_nobody_reads(served, tmp_path):
    url, _directory, manifest, _requests = served
    infos = manifest.split("train").shards
    largest = max(info.bytes for info in infos)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "notes.txt").write_bytes(bytes(4 * largest))  # not the cache's: kept, not counted
    # Room for three shards of these: a fourth needs one evicted.
    with open_cache(open_source(url), infos, cache_dir, 3 * largest + 100) as cache:
        paths = [fetch(cache, number) for number in range(3)]
        for age, path in zip((300, 100, 200), paths, strict=True):
            os.utime(path, (time.time(), time.time() - age))  # last used 300, 100, 200 s ago
        fetch(cache, 3)
        assert [path.exists() for path in paths] == [False, True, True]  # the oldest went
        # Shard 2 is the oldest now; a reader holds it (as each read does): shard 1 goes.
        with open(paths[2], "rb") as reading:
            fcntl.flock(reading, fcntl.LOCK_SH)
            fetch(cache, 4)
            assert [path.exists() for path in paths] == [False, False, True]
        # Only shards staged ahead can go (shard 2 is read): the one needed last goes first.
        os.utime(cache.paths[3], (time.time(), AHEAD + 0))
        os.utime(cache.paths[4], (time.time(), AHEAD + 1))
        with open(paths[2], "rb") as reading:
            fcntl.flock(reading, fcntl.LOCK_SH)
            fetch(cache, 5)
        assert paths[2].exists() and cache.paths[3].exists() and not cache.paths[4].exists()
        assert disk_bytes(cache.directory) - 4 * largest <= 3 * largest + 100
    assert (cache_dir / "notes.txt").stat().st_size == 4 * largest


def flip_byte_in_jpeg(directory: Path, name: str) -> None:
    """Corrupt one byte of the first JPEG (the tar stays a valid tar)."""
    first = parse_index((directory / name).with_suffix(".idx").read_text())[0]
    jpg = next(component for component in first.components if component.ext == "jpg")
    path = directory / name
    data = bytearray(path.read_bytes())
    data[jpg.offset + jpg.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", ["flipped-byte", "truncated", "longer"])
def test_corrupt_remote_shard_is_detected_and_never_cached(served, tmp_path, corruption):
    url, directory, manifest, _requests = served
    bad, good = 2, 3
    path = directory / "train-000002.tar"
    if corruption == "flipped-byte":
        flip_byte_in_jpeg(directory, path.name)
        expected = "sha256"
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[:-1024])
        expected = "ended after"
    else:
        path.write_bytes(path.read_bytes() + bytes(4096))
        expected = "holds more than"
    infos = manifest.split("train").shards
    cache_dir = tmp_path / "cache"
    watcher = DiskWatcher(cache_dir)
    with open_cache(open_source(url), infos, cache_dir, dataset_bytes(manifest)) as cache:
        # On demand.
        with pytest.raises(ShardVerificationError, match=rf"^train-000002\.tar: .*{expected}"):
            fetch(cache, bad)
        assert shard_files_named(cache_dir, path.name) == []
        # Through the prefetcher: the good shard arrives, the bad one is reported, not used.
        cache.prefetch([bad, good])
        assert sha256_of_file(fetch(cache, good)) == infos[good].sha256
        with pytest.raises(ShardVerificationError, match=expected):
            fetch(cache, bad)
        assert shard_files_named(cache_dir, path.name) == []
        lock_bytes = (cache_dir / ".lock").stat().st_size
        assert disk_bytes(cache.directory) == infos[good].bytes + lock_bytes
    watcher.stop()
    assert not cache.paths[bad].exists()


def test_stale_index_is_detected(served, tmp_path):
    url, directory, manifest, _requests = served
    index_path = directory / "train-000001.idx"
    lines = index_path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # samples listed in the wrong order
    index_path.write_text("\n".join(lines) + "\n")
    infos = manifest.split("train").shards
    with open_cache(open_source(url), infos, tmp_path / "cache", 10**9) as cache:
        with pytest.raises(ShardVerificationError, match=r"train-000001\.tar: its index"):
            fetch(cache, 1)
        assert shard_files_named(tmp_path / "cache", "train-000001.tar") == []


def test_an_index_of_another_build_is_refused_before_any_download(served, tmp_path):
    from pipeline.load.staging import open_remote_split

    url, directory, manifest, requests = served
    index_path = directory / "train-000001.idx"
    header, *lines = index_path.read_text().splitlines()
    version, count = header.split()
    # A well-formed index of one sample fewer than the manifest records.
    index_path.write_text("\n".join([f"{version} {int(count) - 1}", *lines[:-1]]) + "\n")
    recorded = manifest.split("train").shards[1].num_samples
    message = (
        rf"train-000001\.idx lists {recorded - 1} samples, the manifest {recorded}; "
        "the index and the manifest are from different builds"
    )
    with pytest.raises(UserError, match=message):
        open_remote_split(open_source(url), manifest, "train", tmp_path / "cache", None, 8)
    assert not any(path.endswith(".tar") for path in requests)
    assert not (tmp_path / "cache").exists()


def test_a_staged_shard_reads_as_the_served_tar(served, tmp_path):
    url, directory, manifest, _requests = served
    infos = manifest.split("val").shards
    assert infos[0].file == "val-000000.tar"
    with open_cache(open_source(url), infos, tmp_path / "cache", 10**9) as cache:
        with tarfile.open(fetch(cache, 0)) as archive:
            names = [member.name for member in archive]
        first = parse_index((directory / "val-000000.idx").read_text())[0]
        jpg = next(component for component in first.components if component.ext == "jpg")
        assert (
            cache.read(0, jpg.offset, jpg.size)
            == dict(iter_shard(directory / infos[0].file))["val_0_0"]["jpg"]
        )
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
    log = tmp_path / "commands.log"
    source = open_source(f"pipe:echo {{file}} >> {log}; cat {directory}/{{file}}")
    assert read_manifest(source) == manifest
    infos = manifest.split("train").shards
    with open_cache(source, infos, tmp_path / "cache", dataset_bytes(manifest) // 2) as cache:
        cache.prefetch(range(len(infos)))
        for number, info in enumerate(infos):
            served_digest = hashlib.sha256((directory / info.file).read_bytes()).hexdigest()
            assert sha256_of_file(fetch(cache, number)) == served_digest
    tars = sorted(line for line in log.read_text().split() if line.endswith(".tar"))
    assert tars == sorted(info.file for info in infos)  # each shard run once
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
        read_manifest(open_source("http://127.0.0.1:1/s"))
    (directory / "train-000004.tar").unlink()
    infos = manifest.split("train").shards
    with open_cache(open_source(url), infos, tmp_path / "cache", 10**9) as cache:
        with pytest.raises(UserError, match=r"/shards/train-000004\.tar is missing \(HTTP 404\)"):
            fetch(cache, 4)
        assert shard_files_named(tmp_path / "cache", "train-000004.tar") == []


def test_stores_without_their_library_say_what_to_install():
    # In a fresh process, before anything imports s3fs (gcsfs is not installed at all).
    script = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from shards.errors import UserError\n"
        "from shards.remote import open_source\n"
        "for url in ('s3://bucket/imagenet/shards', 'gs://bucket/shards'):\n"
        "    try:\n"
        "        open_source(url)\n"
        "    except UserError as error:\n"
        "        print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    s3, gs = result.stdout.splitlines()
    assert s3.startswith("s3://bucket/imagenet/shards: ") and "s3fs" in s3
    assert "pip install 'alexpipe[s3]'" in s3
    assert gs.startswith("gs://bucket/shards: ") and "gcsfs" in gs


def test_location_checks(served, tmp_path):
    _url, directory, manifest, _requests = served
    with pytest.raises(UserError, match="nosuch://host/shards: unsupported shard location"):
        open_source("nosuch://host/shards")
    assert isinstance(open_source(f"file://{directory}"), LocalSource)
    # Shard names come from a possibly remote manifest and end up in shell commands.
    hostile = tmp_path / "hostile"
    shutil.copytree(directory, hostile)
    document = manifest.as_json()
    document["splits"]["train"]["shards"][0]["file"] = "x;rm -rf ~;.tar"
    write_json_atomic(hostile / "manifest.json", document)
    with pytest.raises(UserError, match="not a plain file name"):
        read_manifest(open_source(f"pipe:cat {hostile}/{{file}}"))


def test_cache_limits_and_one_process_per_directory(served, tmp_path):
    _url, directory, manifest, _requests = served
    infos = manifest.split("train").shards
    remote = open_source(f"pipe:cat {directory}/{{file}}")
    largest = max(info.bytes for info in infos)
    with pytest.raises(UserError, match="too small.*--cache-size") as caught:
        open_cache(remote, infos, tmp_path / "cache", largest)
    assert describe_bytes(2 * largest) in str(caught.value)  # two of the largest, at least
    with open_cache(remote, infos, tmp_path / "cache", 10**9) as cache:
        # This process's other loaders (train and val) may share it; another process may not.
        with open_cache(remote, infos, tmp_path / "cache", 10**9):
            pass
        script = (
            "import sys\n"
            f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
            "from test_remote import open_cache\n"
            "from shards.errors import UserError\n"
            "from shards.remote import open_source, read_manifest\n"
            "source = open_source(sys.argv[1])\n"
            "infos = read_manifest(source).split('train').shards\n"
            "try:\n"
            "    open_cache(source, infos, sys.argv[2], 10**9)\n"
            "except UserError as error:\n"
            "    print(error)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, remote.location, str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=120,
        )
        assert f"in use by another process (pid {os.getpid()})" in result.stdout, result.stderr
        assert sha256_of_file(fetch(cache, 0)) == infos[0].sha256
    # A temporary directory (no cache_dir) is this cache's alone, and goes with it.
    with open_cache(remote, infos, None, 10**9) as cache:
        temporary = cache.directory
        assert sha256_of_file(fetch(cache, 1)) == infos[1].sha256
    assert not temporary.exists()


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
