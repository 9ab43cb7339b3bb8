"""Starting or joining Ray for the build: public ``ray.init``, documented switches.

A private local instance listens on 127.0.0.1 only. On Linux Ray binds its
servers to every interface and advertises the machine's primary address;
on macOS and Windows it keeps a single machine on loopback. The switch
between the two is the environment variable Ray documents for clusters on
those systems, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
(https://docs.ray.io/en/latest/cluster/getting-started.html); set to 0 on
Linux it gives the loopback behaviour. Ray reads it once, when it is
imported, so a local session sets it before its first ``import ray``; a
process that imported Ray earlier without it is refused a local instance
(one line) rather than given one that listens on the network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shards.errors import UserError

CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Plain mappings of environment variables Ray documents, set before Ray is
# imported and inherited by the processes it starts. A local session sets
# all of them; joining a cluster sets the quiet ones the user did not set.
LOCAL_ONLY_ENVIRONMENT = {
    CLUSTER_SWITCH: "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
QUIET_ENVIRONMENT = {
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
CLUSTER_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0"}

# How long a cluster's head may take to accept a TCP connection, and then to
# answer as a gRPC server. Measured with Ray 2.60: ray.init on an address
# where no head answers retries for minutes (a closed port: still retrying
# after 327 s, when it was stopped), so the build asks first, in seconds; a
# port that accepts and stays silent (a hung head, a tunnel with nothing
# behind it) is caught the same way.
REACHABLE_TIMEOUT_S = 5.0
# What an HTTP/2 client sends first (RFC 9113, section 3.4: the preface and an
# empty SETTINGS frame); a gRPC server, which Ray's head is, answers with a
# SETTINGS frame (type 4) of its own.
HTTP2_CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_SETTINGS_FRAME = 4

TOKEN_SOURCES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def check_cluster_address(address: str) -> None:
    """Fail fast, in one line, when --address names no Ray head that answers.

    ``auto`` is checked at the address Ray would take for it (see
    :func:`address_of_auto`); when there is none, Ray says so at once.
    """
    named = address
    if address == "auto":
        found = address_of_auto()
        if found is None:
            return
        address, source = found
        named = f"auto ({address}, from {source})"
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {named!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), REACHABLE_TIMEOUT_S) as link:
            link.sendall(HTTP2_CLIENT_PREFACE)
            reply = _receive(link, HTTP2_FRAME_HEADER_BYTES)
    except TimeoutError:
        raise UserError(
            f"cannot join the Ray cluster at {named}: nobody answers "
            f"within {REACHABLE_TIMEOUT_S:g} s"
        ) from None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise UserError(f"cannot join the Ray cluster at {named}: {reason}") from None
    if len(reply) < HTTP2_FRAME_HEADER_BYTES or reply[3] != HTTP2_SETTINGS_FRAME:
        raise UserError(
            f"cannot join the Ray cluster at {named}: something answers there, but not "
            "a Ray head (give the GCS port that `ray start --head` printed, 6379 by default)"
        )


def address_of_auto() -> tuple[str, str] | None:
    """The address ``ray.init(address="auto")`` joins, and where it comes from, or None.

    As ``ray.init``'s documentation gives the order: ``RAY_ADDRESS``, else the
    address the latest ``ray start`` on this machine wrote to
    ``ray_current_cluster`` in Ray's temporary directory (``/tmp/ray``, or
    ``ray`` under ``RAY_TMPDIR`` or ``TMPDIR``). A file that a crashed or
    ended cluster left behind is what makes ``auto`` wait minutes.
    """
    from_environment = os.environ.get("RAY_ADDRESS", "")
    if from_environment and from_environment != "auto":
        return from_environment, "RAY_ADDRESS"
    temp_root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    latest = Path(temp_root) / "ray" / "ray_current_cluster"
    try:
        recorded = latest.read_text().strip()
    except OSError:
        return None
    return (recorded, str(latest)) if recorded else None


def _receive(link: socket.socket, count: int) -> bytes:
    """Up to ``count`` bytes: fewer only if the other side closed the connection."""
    data = b""
    while len(data) < count:
        chunk = link.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _usable_cpus(ray) -> int:
    """The CPUs of the cluster (or local instance) that tasks can use, at least one."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def is_local(address: str | None) -> bool:
    """Whether ``--address`` asks for a private instance on this machine."""
    return address in (None, "", "local")


def ray_already_running() -> bool:
    """Whether this process is already connected to Ray (tests, notebooks)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def _environment(settings: dict[str, str], override: bool) -> Iterator[None]:
    """Set ``settings`` (all of them, or only the unset ones) for the block, then
    put the environment back, so later processes (another `ray start`, a
    cluster job) are unaffected; Ray's processes have theirs by then."""
    saved = {name: os.environ.get(name) for name in settings}
    for name, value in settings.items():
        if override or name not in os.environ:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator[int]:
    """Run a block with Ray ready; yield the number of CPUs the tasks can use.

    ``address=None`` starts a private instance on this machine (loopback only,
    ``workers`` CPUs); any other address (``auto``, ``HOST:PORT``,
    ``ray://...``) joins that cluster and uses all of its CPUs. A process
    already connected to Ray keeps its connection (and it is not shut down).
    A process that started a private instance stays in Ray's loopback mode:
    join clusters from another process (as the CLI always does).
    """
    if ray_already_running():  # a session the caller opened (tests, notebooks)
        import ray

        yield _usable_cpus(ray)
        return
    local = is_local(address)
    options = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    if local:
        settings = {**QUIET_ENVIRONMENT, **LOCAL_ONLY_ENVIRONMENT}
    else:
        settings = {**QUIET_ENVIRONMENT, **CLUSTER_ENVIRONMENT}
    with _environment(settings, override=local):
        import ray

        if local:
            _require_loopback(ray)
            ray.init(address="local", num_cpus=workers or os.cpu_count(), **options)
        else:  # build_shards checked that a head answers (check_cluster_address)
            _join(ray, address, options)
    try:
        yield _usable_cpus(ray)
    finally:
        ray.shutdown()


def _require_loopback(ray) -> None:
    """Refuse a local instance that would listen on the network (see the module docstring).

    Before ``ray.init``, Ray's public ``get_node_ip_address`` answers with the
    address the new instance will advertise and bind.
    """
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:
        raise UserError(
            f"Ray was imported before the build without {CLUSTER_SWITCH}=0, so a private "
            f"Ray instance would listen on {node_ip}; set {CLUSTER_SWITCH}=0 before "
            "importing ray, or start Ray yourself (ray.init) before building"
        )


def _join(ray, address: str, options: dict) -> None:
    """``ray.init`` on a cluster; a failure is one line, a missing token says so.

    Until it has connected, Ray's C++ client writes a warning to stderr per
    failed attempt (20 lines over 20 s for a refused token, with Ray 2.60),
    before ``RAY_BACKEND_LOG_LEVEL`` applies; those lines go to a log file
    instead, named in the error when it helps, and removed otherwise.
    """
    with tempfile.NamedTemporaryFile(
        prefix="alexpipe-ray-join-", suffix=".log", delete=False
    ) as log:
        log_path = Path(log.name)
    try:
        with _stderr_into(log_path):
            ray.init(address=address, **options)
    except (
        ConnectionError,
        RuntimeError,
        TimeoutError,
        ValueError,
        ray.exceptions.RayError,
    ) as error:
        problem = _token_problem(ray, address, error)
        if problem is None:
            lines = str(error).strip().splitlines() or [type(error).__name__]
            problem = f"cannot join the Ray cluster at {address}: {lines[0]}"
            if log_path.stat().st_size:
                problem += f" (Ray's messages: {log_path})"
                log_path = None
        if log_path is not None:
            log_path.unlink(missing_ok=True)
        raise UserError(problem) from error
    log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _stderr_into(path: Path) -> Iterator[None]:
    """Point this process's file descriptor 2 at ``path`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _token_problem(ray, address: str, error: BaseException) -> str | None:
    """The one line for a join that failed over Ray's token authentication, or None.

    Ray 2.52+ raises ``AuthenticationError`` when ``RAY_AUTH_MODE=token`` and no
    token is found; a cluster that refuses the request (no token sent, or
    another one) shows as an ``AuthenticationError`` in the cause of the
    ``ConnectionError`` that ``ray.init`` raises after its retries.
    """
    refused = ray.exceptions.AuthenticationError
    texts = [str(error), str(error.__cause__ or ""), str(error.__context__ or "")]
    rejected = any("InvalidAuthToken" in text or refused.__name__ in text for text in texts)
    if isinstance(error, refused) and "InvalidAuthToken" not in str(error):
        return (
            f"cannot join the Ray cluster at {address}: RAY_AUTH_MODE=token but no auth "
            f"token here; give the cluster's token ({TOKEN_SOURCES})"
        )
    if not rejected:
        return None
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return (
            f"cannot join the Ray cluster at {address}: it refused this auth token; "
            f"give the cluster's token ({TOKEN_SOURCES})"
        )
    return (
        f"cannot join the Ray cluster at {address}: it wants an auth token; set "
        f"RAY_AUTH_MODE=token and give the cluster's token ({TOKEN_SOURCES})"
    )
