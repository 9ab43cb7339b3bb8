"""Starting or joining Ray for the build, quietly and on loopback by default.

On Linux Ray binds its servers to the machine's primary interface and turns
"127.0.0.1" into that address. A private local instance needs none of that,
so for local builds we switch off Ray's cluster mode (the same switch Ray
uses on macOS and Windows): every listener then stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator

from shards.errors import UserError

# Read by Ray when it is imported and inherited by the processes it starts.
LOCAL_ONLY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
QUIET_ENVIRONMENT = {
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


# Head-node daemons a private, fixed-size, log-to-driver-off instance never
# uses: the autoscaler's monitor and the log monitor (it forwards worker
# output to the driver). Together they cost about 2 CPU-seconds to start and
# a second to stop, which on a 2-core machine is 5-10 % of a small build.
LEAN_HEAD_PARAMETERS = {"no_monitor": True, "include_log_monitor": False}


@contextlib.contextmanager
def _lean_head_parameters() -> Iterator[None]:
    """Have ``ray.init`` start a local head without the daemons above.

    ``ray.init`` does not expose these switches (``ray start`` does, at the
    price of another Python process), but it builds its node from
    ``ray._private.parameter.RayParams``, which has them; we give it those
    defaults for the one call. If a Ray release drops the switches, Ray
    starts as it always did.
    """
    from ray._private import parameter

    original = parameter.RayParams
    known = inspect.signature(original).parameters
    if not all(name in known for name in LEAN_HEAD_PARAMETERS):
        yield
        return

    class LeanRayParams(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**LEAN_HEAD_PARAMETERS, **kwargs})

    parameter.RayParams = LeanRayParams
    try:
        yield
    finally:
        parameter.RayParams = original


# How long a cluster's head may take to accept a TCP connection. Ray's own
# retries on an unreachable address last minutes before they give up, so a
# build checks first (before it spends minutes listing ImageNet).
REACHABLE_TIMEOUT_S = 10.0


def check_cluster_address(address: str) -> None:
    """Fail fast, in one line, when a HOST:PORT or ray://HOST:PORT does not answer."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return  # Ray finds the address itself (and fails fast when it cannot)
        raise UserError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), REACHABLE_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise UserError(f"cannot join the Ray cluster at {address}: {reason}") from None


def _usable_cpus(ray) -> int:
    """The CPUs of the cluster (or local instance) that tasks can use, at least one."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def is_local(address: str | None) -> bool:
    """Whether ``--address`` asks for a private instance on this machine."""
    return address in (None, "", "local")


def ray_already_running() -> bool:
    """Whether this process is already connected to Ray (tests, notebooks).

    Answers without importing Ray: a caller may want to fork first.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def ray_session(
    address: str | None, workers: int | None, shutdowns: list | None = None
) -> Iterator[int]:
    """Run a block with Ray ready; yield the number of CPUs the tasks can use.

    ``address=None`` starts a private instance on this machine (loopback only,
    ``workers`` CPUs); any other address (``auto``, ``HOST:PORT``,
    ``ray://...``) joins that cluster and uses all of its CPUs.

    Shutting a local instance down takes up to a second (Ray waits for its
    daemons to exit). With ``shutdowns`` (a list) the shutdown runs in a
    thread appended to it, so the caller can finish its own work meanwhile;
    it must join those threads before it returns.
    """
    local = is_local(address)
    import ray

    if ray_already_running():  # a session the caller opened (tests, notebooks)
        yield _usable_cpus(ray)
        return
    from ray._private import ray_constants

    settings = dict(QUIET_ENVIRONMENT)
    settings.update(LOCAL_ONLY_ENVIRONMENT if local else {"RAY_USAGE_STATS_ENABLED": "0"})
    saved_environment = {name: os.environ.get(name) for name in settings}
    saved_cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    for name, value in settings.items():
        if local or name not in os.environ:
            os.environ[name] = value
    options = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    try:
        if local:
            # The environment reaches the processes Ray starts; this reaches
            # the already-imported module (ray may be imported before us).
            ray_constants.ENABLE_RAY_CLUSTER = False
            with _lean_head_parameters():
                ray.init(address="local", num_cpus=workers or os.cpu_count(), **options)
        else:  # build_shards checked the address answers (check_cluster_address)
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, TimeoutError, ValueError) as error:
                lines = str(error).strip().splitlines() or [type(error).__name__]
                raise UserError(f"cannot join the Ray cluster at {address}: {lines[0]}") from error
    finally:
        # Ray's processes have their environment now; leave ours as it was,
        # so later processes (another `ray start`, a cluster job) are unaffected.
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def shut_down() -> None:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster_mode

    try:
        yield _usable_cpus(ray)
    finally:
        if shutdowns is None:
            shut_down()
        else:
            thread = threading.Thread(target=shut_down, name="alexpipe-ray-shutdown")
            thread.start()
            shutdowns.append(thread)
