"""Loading and training from shards served over HTTP, through a cache half the dataset's size.

A real ``ThreadingHTTPServer`` on 127.0.0.1 serves shard directories built by
``conftest.build_shard_dir`` (8 train shards of 20 images). The loaders use a
shuffle window of 8 images, so the shards in use at once fit in half the
dataset; the remote loader must give exactly the local loader's batches. Two
ranks run as two processes at once, each with its own cache directory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_shard_dir

from pipeline.load.loader import create_loader
from shards.atomic import is_temporary
from shards.cache import ShardVerificationError, describe_bytes
from shards.errors import UserError
from shards.index import parse_index
from shards.reader import iter_shard, sha256_of_file
from shards.remote import read_manifest

TESTS_DIR = Path(__file__).resolve().parent
TRAIN_IMAGES = 160  # 8 shards of 20
SHUFFLE_WINDOW = 8
BATCH_SIZE = 8
SEED = 3
CORRUPT_SHARD = "train-000003.tar"


class QuietHandler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


def flip_byte_in_first_jpeg(path: Path) -> None:
    """Corrupt one byte inside the first JPEG of a shard (the tar stays a valid tar)."""
    first = parse_index(path.with_suffix(".idx").read_text())[0]
    jpg = next(component for component in first.components if component.ext == "jpg")
    data = bytearray(path.read_bytes())
    data[jpg.offset + jpg.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(URL of the shards, their directory, URL of a copy with one corrupt shard, the paths
    requested with GET)."""
    root = tmp_path_factory.mktemp("served")
    directory = build_shard_dir(root / "shards", train_images=TRAIN_IMAGES)
    shutil.copytree(directory, root / "corrupt")
    flip_byte_in_first_jpeg(root / "corrupt" / CORRUPT_SHARD)
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (QuietHandler,), {"requests": requests}), directory=str(root)
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield f"{base}/shards/", directory, f"{base}/corrupt", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def split_bytes(directory: Path, split: str = "train") -> int:
    """Bytes of a split's tars: what the cache counts."""
    return sum(info.bytes for info in read_manifest(directory).split(split).shards)


def disk_bytes(directory: Path) -> int:
    total = 0
    for path in list(directory.iterdir()) if directory.exists() else []:
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # evicted meanwhile
            pass
    return total


def files_open_in(directory: Path) -> set[str]:
    """Staged shards in ``directory`` that this process keeps open (an evicted one shows as
    deleted): open in two looks 20 ms apart, so that a prefetch thread's brief open (to evict
    one) does not count; downloads being written are temporaries, not counted either."""
    looks = []
    for _ in range(2):
        targets = set()
        for descriptor in Path("/proc/self/fd").iterdir():
            try:
                targets.add(os.readlink(descriptor))
            except OSError:  # closed meanwhile
                pass
        looks.append({t for t in targets if t.startswith(str(directory)) and ".tar" in t})
        time.sleep(0.02)
    return {target for target in looks[0] & looks[1] if not is_temporary(Path(target))}


class DiskWatcher:
    """The most bytes seen on disk in a directory (temporaries included) until stopped."""

    def __init__(self, directory: Path):
        self.directory, self.largest = directory, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.largest = max(self.largest, disk_bytes(self.directory))
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.largest, disk_bytes(self.directory))


def epochs_of(loader, epochs: int) -> list[list[tuple[torch.Tensor, ...]]]:
    return [list(loader) for _ in range(epochs)]


def check_rank(url, directory, cache_dir, backend, rank, world_size, num_threads, half) -> list:
    """Run two epochs of rank ``rank`` from ``url`` and from ``directory``; assert equal
    batches and a bounded, clean cache; return the sample indices of each epoch."""
    directory, cache_dir = Path(directory), Path(cache_dir)
    common = {
        "batch_size": BATCH_SIZE,
        "backend": backend,
        "world_size": world_size,
        "seed": SEED,
        "num_threads": num_threads,
        "with_index": True,
        "shuffle_window": SHUFFLE_WINDOW,
    }
    seen = []
    local = create_loader(directory, "train", rank=rank, **common)
    remote = create_loader(url, "train", rank=rank, cache_dir=cache_dir, cache_bytes=half, **common)
    watcher = DiskWatcher(cache_dir)
    try:
        assert len(remote) == len(local)
        for local_batches, remote_batches in zip(
            epochs_of(local, 2), epochs_of(remote, 2), strict=True
        ):
            assert len(remote_batches) == len(local_batches) == len(local)
            for (images, labels, indices), (local_images, local_labels, local_indices) in zip(
                remote_batches, local_batches, strict=True
            ):
                assert torch.equal(indices, local_indices) and torch.equal(labels, local_labels)
                assert torch.equal(images, local_images)
            seen.append(torch.cat([batch[2] for batch in remote_batches]).tolist())
            assert disk_bytes(cache_dir) <= half
            assert files_open_in(cache_dir) == set()  # readers keep no staged file open
        assert watcher.stop() <= half
        staged = [path for path in cache_dir.iterdir() if path.suffix == ".tar"]
        assert staged and not [path for path in cache_dir.iterdir() if is_temporary(path)]
        for path in staged:
            shard = remote.table.paths.index(path)
            assert sha256_of_file(path) == sha256_of_file(local.table.paths[shard])
    finally:
        watcher.stop()
        remote.close()
        local.close()
    return seen


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_half_size_cache_gives_the_local_batches_every_epoch(served, tmp_path, backend, world_size):
    url, directory, _corrupt, requests = served
    half = split_bytes(directory) // 2
    # Each batch in flight adds shards in use: keep the torch workers' queue short enough.
    num_threads = {1: 2, 2: 1}[world_size] if backend == "torch" else 1
    ranks = [
        [url, str(directory), str(tmp_path / f"cache/rank-{rank}"), backend, rank]
        + [world_size, num_threads, half]
        for rank in range(world_size)
    ]
    requests.clear()
    if world_size == 1:
        seen = [check_rank(*ranks[0])]
    else:
        # The ranks as two processes at once, each with its own CACHE_DIR/rank-N.
        script = (
            "import json, sys\n"
            f"sys.path.insert(0, {str(TESTS_DIR)!r})\n"
            "from test_remote_training import check_rank\n"
            "print(json.dumps(check_rank(*json.loads(sys.argv[1]))))\n"
        )
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, json.dumps(arguments)],
                stdout=subprocess.PIPE,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                text=True,
            )
            for arguments in ranks
        ]
        outputs = [process.communicate(timeout=400)[0] for process in processes]
        assert [process.returncode for process in processes] == [0] * world_size
        seen = [json.loads(output.splitlines()[-1]) for output in outputs]
    for epoch in range(2):  # every sample exactly once per epoch, over the ranks
        assert sorted(sum((rank[epoch] for rank in seen), [])) == list(range(TRAIN_IMAGES))
    assert seen[0][0] != seen[0][1]  # reshuffled
    # Half the dataset cannot keep every shard: the second epoch fetched some again.
    num_shards = len(read_manifest(directory).split("train").shards)
    assert len([path for path in requests if path.endswith(".tar")]) > world_size * num_shards


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_remote_shard_stops_the_epoch_and_is_never_used(served, tmp_path, backend):
    url, directory, corrupt_url, _requests = served
    corrupt_indices = {
        json.loads(members["json"])["index"]
        for _key, members in iter_shard(directory / CORRUPT_SHARD)
    }
    cache_dir = tmp_path / "cache"
    loader = create_loader(
        corrupt_url,
        "train",
        batch_size=BATCH_SIZE,
        backend=backend,
        seed=SEED,
        num_threads=2 if backend == "torch" else 1,
        with_index=True,
        shuffle_window=SHUFFLE_WINDOW,
        cache_dir=cache_dir,
        cache_bytes=split_bytes(directory) // 2,
    )
    delivered = []
    try:
        with pytest.raises(
            ShardVerificationError, match=rf"^{CORRUPT_SHARD}: sha256 .*not using it$"
        ) as caught:
            for _images, _labels, indices in loader:
                delivered += indices.tolist()
    finally:
        loader.close()
    assert "\n" not in str(caught.value)  # one line, also from a DataLoader worker
    assert delivered and not corrupt_indices & set(delivered)
    stem = CORRUPT_SHARD.removesuffix(".tar")
    assert not [path for path in cache_dir.iterdir() if path.name.lstrip(".").startswith(stem)]


def test_too_small_a_cache_is_refused_with_the_minimum(served, tmp_path):
    url, directory, _corrupt, _requests = served
    # The default shuffle window spans the whole split: every shard is in use at once.
    with pytest.raises(UserError, match=r"too small") as caught:
        create_loader(url, "train", backend="torch", cache_dir=tmp_path, cache_bytes=10**6)
    assert "at least that" in str(caught.value)
    assert describe_bytes(split_bytes(directory)) in str(caught.value)
    with pytest.raises(UserError, match="not a complete alexpipe shard directory"):
        create_loader(url + "nowhere/", "train", backend="torch", cache_dir=tmp_path)
    # Local shards are read in place: no cache, not even its directory.
    loader = create_loader(directory, "val", backend="torch", cache_dir=tmp_path / "unused")
    assert loader.cache is None and not (tmp_path / "unused").exists()


def test_pipe_location_gives_the_local_val_batches(served, tmp_path):
    _url, directory, _corrupt, _requests = served
    common = {"batch_size": 4, "backend": "torch", "num_threads": 0, "with_index": True}
    local = create_loader(directory, "val", **common)
    remote = create_loader(f"pipe:cat {directory}/{{file}}", "val", cache_dir=tmp_path, **common)
    try:
        for (images, labels, indices), expected in zip(remote, local, strict=True):
            assert torch.equal(images, expected[0]) and torch.equal(indices, expected[2])
            assert torch.equal(labels, expected[1])
    finally:
        remote.close()


@pytest.fixture
def one_torch_thread():
    """On shared cores, spinning OpenMP threads cost more than they give (as in test_train)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_and_eval_commands_read_http_shards(served, tmp_path, one_torch_thread):
    from alexpipe.commands.train import eval_command
    from alexpipe.commands.train import train as train_command

    url, directory, _corrupt, _requests = served
    run, cache_dir = tmp_path / "run", tmp_path / "cache"
    runner = CliRunner()
    arguments = ["--shards", url, "--out", str(run), "--cache-dir", str(cache_dir)]
    arguments += ["--cache-size", "64M", "--epochs", "1", "--backend", "torch"]
    arguments += ["--width", "0.0625", "--batch-size", "8", "--device", "cpu"]
    result = runner.invoke(train_command, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps and max(steps) == TRAIN_IMAGES // 8
    (evaluation,) = [row for row in rows if "top1_err" in row]
    assert 0 <= evaluation["top1_err"] <= 1
    # One process: its cache is CACHE_DIR/rank-0, holding verified copies of the served shards.
    manifest = read_manifest(directory)
    digests = {info.sha256 for info in manifest.every_shard()}
    staged = list((cache_dir / "rank-0").glob("*.tar"))
    assert staged and {sha256_of_file(path) for path in staged} <= digests

    arguments = ["--shards", url, "--checkpoint", str(run / "checkpoint.pt"), "--json"]
    arguments += ["--cache-dir", str(tmp_path / "eval-cache"), "--cache-size", "16M"]
    arguments += ["--backend", "torch", "--device", "cpu", "--batch-size", "4"]
    result = runner.invoke(eval_command, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_images"] == 13 and summary["top1_err"] == pytest.approx(
        evaluation["top1_err"]
    )
    assert list((tmp_path / "eval-cache").glob("val-*.tar"))


def test_each_process_of_a_node_gets_its_part_of_the_cache(monkeypatch, tmp_path):
    from trainer.config import TrainConfig
    from trainer.data import cache_options

    config = TrainConfig(
        shards_dir="http://127.0.0.1:1/s/", out_dir=str(tmp_path), device="cpu",
        cache_dir=str(tmp_path / "cache"), cache_size="3G",
    )  # fmt: skip
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cache_options(config, rank=2, world_size=3) == {  # --nproc 3: all on this node
        "cache_dir": str(tmp_path / "cache" / "rank-2"),
        "cache_bytes": 2**30,
    }
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: rank 5 of 8, second of 4 on its node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cache_options(config, rank=5, world_size=8) == {
        "cache_dir": str(tmp_path / "cache" / "rank-1"),
        "cache_bytes": 3 * 2**30 // 4,
    }
    assert cache_options(config.replace(cache_dir=None, cache_size=None), 5, 8) == {
        "cache_dir": None,
        "cache_bytes": None,
    }
    with pytest.raises(UserError, match="cannot read size"):
        config.replace(cache_size="lots")
