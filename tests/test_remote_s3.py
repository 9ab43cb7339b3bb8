"""Shards on S3: a real moto S3 server on 127.0.0.1 (server mode), read through s3fs.

The bucket is filled with s3fs, and the loaders reach it as users' do: an
``s3://`` location, credentials and endpoint from botocore's environment
(``AWS_ENDPOINT_URL``), which DataLoader workers inherit.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket

import pytest
import torch
from conftest import build_shard_dir

from pipeline.load.loader import create_loader
from shards.cache import ShardVerificationError
from shards.errors import UserError
from shards.reader import iter_shard, sha256_of_file
from shards.remote import read_manifest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "alexpipe-test"
TRAIN_IMAGES = 120  # 6 shards of 20
CORRUPT_SHARD = "train-000001.tar"
COMMON = {"batch_size": 8, "seed": 5, "with_index": True, "shuffle_window": 8}


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """(s3:// URL of the shards, their local directory, URL of a copy with a corrupt shard)."""
    import s3fs

    root = tmp_path_factory.mktemp("s3")
    directory = build_shard_dir(root / "shards", train_images=TRAIN_IMAGES)
    corrupt = root / "corrupt"
    shutil.copytree(directory, corrupt)
    data = bytearray((corrupt / CORRUPT_SHARD).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (corrupt / CORRUPT_SHARD).write_bytes(bytes(data))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_loopback_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as environment:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            environment.setenv(name, value)
        environment.delenv("AWS_PROFILE", raising=False)
        filesystem = s3fs.S3FileSystem()
        filesystem.mkdir(BUCKET)
        for name in ("shards", "corrupt"):
            filesystem.put(f"{root / name}/", f"{BUCKET}/{name}", recursive=True)
        try:
            yield f"s3://{BUCKET}/shards", directory, f"s3://{BUCKET}/corrupt"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def test_s3_metadata_and_missing_objects(bucket):
    url, directory, _corrupt = bucket
    assert read_manifest(url) == read_manifest(directory)
    with pytest.raises(UserError, match=r"not a complete alexpipe shard directory.*is missing"):
        read_manifest(f"s3://{BUCKET}/nowhere")
    with pytest.raises(UserError, match="not a complete alexpipe shard directory"):
        read_manifest("s3://no-such-bucket/shards")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_s3_loader_gives_the_local_batches(bucket, tmp_path, backend):
    url, directory, _corrupt = bucket
    # Three quarters of the dataset: the second epoch has to fetch some shards again.
    limit = sum(info.bytes for info in read_manifest(directory).split("train").shards) * 3 // 4
    # torch: two forked DataLoader workers, each with its own s3fs client.
    common = {**COMMON, "backend": backend, "num_threads": 2 if backend == "torch" else 1}
    local = create_loader(directory, "train", **common)
    remote = create_loader(url, "train", cache_dir=tmp_path / "cache", cache_bytes=limit, **common)
    try:
        for _epoch in range(2):
            pairs = list(zip(remote, local, strict=True))
            assert len(pairs) == len(local)
            for (images, labels, indices), (local_images, local_labels, local_indices) in pairs:
                assert torch.equal(indices, local_indices) and torch.equal(labels, local_labels)
                assert torch.equal(images, local_images)
            assert sum(path.stat().st_size for path in (tmp_path / "cache").iterdir()) <= limit
        for path in (tmp_path / "cache").glob("*.tar"):
            shard = remote.table.paths.index(path)
            assert sha256_of_file(path) == sha256_of_file(local.table.paths[shard])
    finally:
        remote.close()


def test_corrupt_s3_shard_stops_the_run_and_is_never_used(bucket, tmp_path):
    _url, directory, corrupt_url = bucket
    corrupt_indices = {
        json.loads(members["json"])["index"]
        for _key, members in iter_shard(directory / CORRUPT_SHARD)
    }
    loader = create_loader(
        corrupt_url, "train", backend="torch", num_threads=2, cache_dir=tmp_path, **COMMON
    )
    delivered = []
    try:
        with pytest.raises(ShardVerificationError, match=rf"^{CORRUPT_SHARD}: sha256 of s3://"):
            for _images, _labels, indices in loader:
                delivered += indices.tolist()
    finally:
        loader.close()
    assert not corrupt_indices & set(delivered)
    stem = CORRUPT_SHARD.removesuffix(".tar")
    assert not [path for path in tmp_path.iterdir() if path.name.lstrip(".").startswith(stem)]
