"""Ray for the build: a private instance on loopback only, clusters checked before joining,
and no object reference left alive when a session ends."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pipeline.build.ray_runtime import check_cluster_address
from shards.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _run_script(body: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter (Ray is imported there first, or not at all)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_no_object_reference_outlives_the_build_session(tmp_path):
    # An ObjectRef released while Ray shuts down can make Ray end the whole
    # process ("The core worker has already been shutdown"), which is what
    # happened while the shard loop's references lived until run_shards
    # returned. So none may be alive when the session ends. References are
    # counted among the objects the garbage collector tracks (ObjectRef is).
    result = _run_script(
        f"""
        import contextlib, gc
        from pathlib import Path
        import pipeline.build.job as job
        from alexpipe.sample import SampleConfig, write_sample
        from pipeline.build.config import BuildConfig

        session = job.ray_session
        alive_at_exit = []

        @contextlib.contextmanager
        def observed_session(*args, **kwargs):  # the real session, looked into
            with session(*args, **kwargs) as cpus:
                yield cpus
                import ray
                refs = [obj for obj in gc.get_objects() if isinstance(obj, ray.ObjectRef)]
                alive_at_exit.append(len(refs))

        job.ray_session = observed_session
        root = Path({str(tmp_path)!r})
        sample = write_sample(
            SampleConfig(out=root / "src", classes=2, train_per_class=6, val_per_class=2,
                         image_scale=0.2)
        )
        for run in range(2):
            out = root / f"out{{run}}"
            job.build_shards(
                BuildConfig(src=sample.out, out=out, shard_size=2, progress=False)
            )
            print("built", run, flush=True)
        print("references alive at the end of each session:", alive_at_exit)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "built 0",
        "built 1",
        "references alive at the end of each session: [0, 0]",
    ]


def test_a_local_build_listens_on_loopback_only(tmp_path):
    # A real build in a real local session; then every TCP listener that the
    # session's processes (the driver, Ray's daemons, its workers) hold is
    # read from /proc/net/tcp and /proc/net/tcp6 while the session is up.
    result = _run_script(
        f"""
        import json, os
        from pathlib import Path
        from alexpipe.sample import SampleConfig, write_sample
        from pipeline.build.config import BuildConfig
        from pipeline.build.job import build_shards
        from pipeline.build.ray_runtime import ray_session
        from tests.proc_listeners import listening_addresses
        from tools.process_tree import descendants

        root = Path({str(tmp_path)!r})
        sample = write_sample(
            SampleConfig(out=root / "src", classes=2, train_per_class=4, val_per_class=1,
                         image_scale=0.2)
        )
        with ray_session(None, 1):
            summary = build_shards(
                BuildConfig(src=sample.out, out=root / "out", shard_size=2, progress=False)
            )
            processes = descendants(os.getpid())
            print(json.dumps({{
                "shards": summary.num_shards,
                "processes": len(processes),
                "listeners": listening_addresses(processes),
            }}))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["shards"] == 5 and report["processes"] >= 4
    # The GCS, the raylet's two servers, the driver's and a worker's core worker at least.
    assert len(report["listeners"]) >= 4, report
    hosts = {ipaddress.ip_address(host) for host, _port in report["listeners"]}
    exposed = {str(host) for host in hosts if not _is_loopback(host)}
    assert not exposed, f"listening beyond loopback: {exposed}"


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def test_ray_imported_in_cluster_mode_gets_no_local_instance():
    # Imported before the build without the switch, Ray would bind a private
    # instance to the machine's address: refused, in one line, before it starts.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    }
    result = _run_script(
        """
        import ray
        from pipeline.build.ray_runtime import ray_session
        from shards.errors import UserError
        try:
            with ray_session(None, 1):
                print("started")
        except UserError as error:
            print("refused:", error)
        print("initialized:", ray.is_initialized())
        """,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    if lines and lines[0] == "started":  # a machine with only loopback: nothing to expose
        assert ipaddress.ip_address(_primary_address()).is_loopback
        return
    assert lines[0].startswith("refused: Ray was imported before the build without ")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in lines[0]
    assert lines[1] == "initialized: False"


def _primary_address() -> str:
    """The address Ray would pick in cluster mode: the one used to reach the outside."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # routing only: UDP connect sends nothing
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_closed_port_is_refused_at_once():
    port = _closed_port()
    with pytest.raises(UserError, match=rf"^cannot join the Ray cluster at 127.0.0.1:{port}: "):
        check_cluster_address(f"127.0.0.1:{port}")


def test_auto_is_checked_where_ray_would_look(tmp_path, monkeypatch):
    # ray.init(address="auto") takes RAY_ADDRESS, else the address file of the
    # latest `ray start`; one left by a cluster that is gone made it wait minutes.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    check_cluster_address("auto")  # nothing recorded: Ray says so itself, at once
    port = _closed_port()
    recorded = tmp_path / "ray" / "ray_current_cluster"
    recorded.parent.mkdir()
    recorded.write_text(f"127.0.0.1:{port}")
    with pytest.raises(UserError) as raised:
        check_cluster_address("auto")
    assert str(raised.value).startswith(
        f"cannot join the Ray cluster at auto (127.0.0.1:{port}, from {recorded}): "
    )
    other_port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{other_port}")
    with pytest.raises(UserError, match=rf"at auto \(127.0.0.1:{other_port}, from RAY_ADDRESS\)"):
        check_cluster_address("auto")


def test_a_port_that_answers_but_not_as_ray_is_one_line():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer_like_a_web_server() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(1024)
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_like_a_web_server)
    thread.start()
    try:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(UserError, match="something answers there, but not a Ray head"):
            check_cluster_address(address)
    finally:
        thread.join(timeout=30)
        server.close()


@pytest.mark.timeout(30)  # the target is 15 s: a 5 s probe plus Python's start-up
def test_build_against_an_address_nobody_answers_fails_in_one_line(tmp_path):
    # A port that accepts the TCP connection (the kernel does, from the
    # backlog) but never says anything: a hung head, a tunnel to nothing.
    # Ray itself would retry it for minutes.
    (tmp_path / "src").mkdir()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "alexpipe.cli", "build-shards", "--src", str(tmp_path / "src")]
            + ["--out", str(tmp_path / "out"), "--address", address],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"alexpipe: error: cannot join the Ray cluster at {address}: nobody answers within 5 s\n"
    )
    assert not (tmp_path / "out").exists()
