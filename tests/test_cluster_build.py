"""build-shards on real Ray clusters: a two-node build equals the local one byte for
byte, and a cluster that wants a token says so in one line.

The two-node cluster (a head and a worker node, one CPU each) runs in a
network namespace that has only loopback (`unshare -n`), so no listener or
connection can touch a real interface; the script ends every process of
that namespace by pid when it finishes. The token test starts one head on
127.0.0.1 (Ray's loopback mode) with its own HOME and temporary directory,
and ends that head's processes by pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alexpipe.sample import SampleConfig, write_sample
from pipeline.build.config import BuildConfig
from pipeline.build.job import build_shards

SCRIPT = Path(__file__).parent / "scripts" / "two_node_ray_build.sh"
RAY = Path(sys.executable).parent / "ray"
ALEXPIPE = [sys.executable, "-m", "alexpipe.cli"]


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


def _session_processes(session_id: int) -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    pairs = (map(int, line.split()) for line in listing.splitlines())
    return [pid for pid, sid in pairs if sid == session_id]


@contextlib.contextmanager
def loopback_ray_head(environment: dict[str, str]) -> Iterator[str]:
    """``ray start --head`` on 127.0.0.1 (a free port); yield its address.

    ``ray start`` runs in a session of its own, which the head's daemons
    keep after it exits: at the end, every process of that session is
    ended by pid (``ray stop`` would stop every Ray of this machine). The
    temporary directory is short because Ray's socket paths must fit in
    107 bytes, and keeps the head out of the machine's /tmp/ray.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    start = subprocess.Popen(
        [str(RAY), "start", "--head", "--port", "0", "--num-cpus", "1"]
        + ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir)],
        env=environment,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output
        yield (temp_dir / "ray_current_cluster").read_text().strip()
    finally:
        if start.poll() is None:
            start.kill()
        for _ in range(3):  # a raylet may start a worker while we end the others
            for pid in _session_processes(start.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_cluster_that_wants_a_token_is_refused_in_one_line(tmp_path):
    # Ray 2.52+ turns token authentication on for `ray start --head` once
    # ~/.ray/auth_token exists; a client with no RAY_AUTH_MODE sends none.
    sample = write_sample(
        SampleConfig(out=tmp_path / "src", classes=2, train_per_class=2, val_per_class=1)
    )
    head_home, client_home = tmp_path / "head-home", tmp_path / "client-home"
    (head_home / ".ray").mkdir(parents=True)
    (head_home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    client_home.mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # Both on loopback: the head binds 127.0.0.1 only, and the client keeps
    # 127.0.0.1 as it is instead of swapping in this machine's address.
    environment.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    command = [*ALEXPIPE, "build-shards", "--src", str(sample.out), "--out", str(tmp_path / "out")]
    with loopback_ray_head(dict(environment, HOME=str(head_home))) as address:
        command += ["--address", address, "--no-progress"]
        client = dict(environment, HOME=str(client_home))
        result = subprocess.run(command, env=client, capture_output=True, text=True, timeout=240)
        # The mode set, but no token on this side: said before any connection.
        no_token = subprocess.run(
            command, env=dict(client, RAY_AUTH_MODE="token"), capture_output=True, text=True
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"alexpipe: error: cannot join the Ray cluster at {address}: it wants an auth token; "
        "set RAY_AUTH_MODE=token and give the cluster's token "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)\n"
    )
    assert no_token.returncode == 1, no_token.stdout + no_token.stderr
    assert no_token.stderr == (
        f"alexpipe: error: cannot join the Ray cluster at {address}: RAY_AUTH_MODE=token but "
        "no auth token here; give the cluster's token "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)\n"
    )
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list(client_home.iterdir()), "the client wrote into its HOME"
