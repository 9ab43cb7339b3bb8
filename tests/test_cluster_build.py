"""build-shards on a real two-node Ray cluster equals the local build, byte for byte.

The cluster (a head and a worker node, one CPU each) runs in a network
namespace that has only loopback (`unshare -n`), so no listener or
connection can touch a real interface; the script ends every process of
that namespace by pid when it finishes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alexpipe.sample import SampleConfig, write_sample
from pipeline.build.config import BuildConfig
from pipeline.build.job import build_shards

SCRIPT = Path(__file__).parent / "scripts" / "two_node_ray_build.sh"


def _can_unshare_network() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return probe.returncode == 0


def _hashes(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


@pytest.mark.skipif(not _can_unshare_network(), reason="needs `unshare -n` (root)")
def test_two_node_cluster_build_is_byte_identical_to_local(tmp_path):
    sample = write_sample(
        SampleConfig(
            out=tmp_path / "src",
            layout="tars",
            classes=3,
            train_per_class=8,
            val_per_class=3,
            image_scale=0.3,
        )
    )
    options = ["--shard-size", "1", "--max-rejected", "1"]
    local = build_shards(
        BuildConfig(
            src=sample.out, out=tmp_path / "local", shard_size=1, max_rejected=1.0, progress=False
        )
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    environment = dict(
        os.environ, HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    result = subprocess.run(
        [
            "unshare",
            "-n",
            "bash",
            str(SCRIPT),
            str(sample.out),
            str(tmp_path / "cluster"),
            str(logs),
            *options,
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 Ray node(s)" in result.stdout, result.stdout
    assert _hashes(tmp_path / "cluster") == _hashes(local.out)
    listeners = (logs / "listeners.txt").read_text().split()
    loopback = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
    hosts = {address.rsplit(":", 1)[0] for address in listeners}
    assert listeners and hosts <= loopback, hosts
