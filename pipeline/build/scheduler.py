"""Running shard tasks: on Ray, with the driver working while Ray starts.

Starting a local Ray instance takes seconds. Meanwhile processes forked
from the driver (``warm_up``) run shards; once Ray is ready it takes the
rest. Each shard is a pure function of its plan, so who runs it changes
nothing in the output.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.build.plan import ShardPlan
from pipeline.build.ray_runtime import is_local, ray_already_running, ray_session
from pipeline.build.shard_task import run_shard
from pipeline.build.warm_up import WarmUpProcesses
from shards.errors import UserError


def _run_shard_on_ray(plan: ShardPlan, transform_config, out_dir: str) -> dict:
    """``run_shard`` as a Ray task; the record says which node ran it."""
    import ray

    record = run_shard(plan, transform_config, Path(out_dir))
    return dict(record, ran_in=ray.get_runtime_context().get_node_id())


def run_shards(
    plans: list[ShardPlan],
    transform_config,
    out_dir: Path,
    address: str | None,
    workers: int | None,
    on_done: Callable[[ShardPlan, dict], None],
    shutdowns: list | None = None,
) -> None:
    """Run every plan once; call ``on_done(plan, record)`` as each finishes.

    ``shutdowns``: see :func:`pipeline.build.ray_runtime.ray_session`.
    """
    out_dir = Path(out_dir).resolve()
    pending_plans = collections.deque(plans)
    # Only a local instance is slow to start; a cluster is joined in about a
    # second, and there every shard should run on the cluster's nodes. A
    # process already connected to Ray has nothing to wait for (and forking
    # it would copy Ray's threads' locks).
    starts_local_ray = is_local(address) and not ray_already_running()
    warm_up_processes = (workers or os.cpu_count() or 1) if starts_local_ray else 0
    warm_up = WarmUpProcesses(pending_plans, transform_config, out_dir, count=warm_up_processes)
    warm_up.start()  # forks: before Ray is imported (importing it takes a second too)
    try:
        with ray_session(address, workers, shutdowns) as cpus:
            warm_up.stop()
            _run_rest_on_ray(pending_plans, warm_up, transform_config, out_dir, cpus, on_done)
    finally:
        warm_up.stop()
        warm_up.join()
    if warm_up.error is not None:
        raise warm_up.error


def _run_rest_on_ray(
    pending_plans: collections.deque,
    warm_up: WarmUpProcesses,
    transform_config,
    out_dir: Path,
    cpus: int,
    on_done: Callable[[ShardPlan, dict], None],
) -> None:
    """Submit what the warm-up left as Ray tasks; report both as they finish.

    Every ObjectRef lives in this frame only and is dropped before it returns
    or raises: Ray ends the whole process when a reference is released after
    its session shut down (and the session shuts down in the background).
    """
    import ray

    # SPREAD: shard tasks are uniform and I/O-heavy; packing them onto the
    # driver's node would leave the rest of a cluster idle.
    remote_run = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(
        _run_shard_on_ray
    )
    transform_ref = ray.put(transform_config)
    # Bounded submission keeps the driver's memory flat on huge builds.
    window = max(2 * cpus, 4)
    in_flight: dict = {}
    done: list = []
    ref = None
    try:
        while True:
            if warm_up.error is not None:
                return  # run_shards raises it: stop before hours of other shards
            for plan, record in warm_up.drain():
                on_done(plan, record)
            while pending_plans and len(in_flight) < window:
                try:
                    plan = pending_plans.popleft()
                except IndexError:  # a warm-up process took the last one
                    break
                in_flight[remote_run.remote(plan, transform_ref, str(out_dir))] = plan
            if not in_flight:
                if not warm_up.alive():
                    break
                warm_up.join(timeout=0.05)
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in done:
                plan = in_flight.pop(ref)
                on_done(plan, _result_of(ref, plan))
        for plan, record in warm_up.drain():
            on_done(plan, record)
    finally:
        in_flight.clear()
        done = _ = ref = transform_ref = None


def _result_of(ref, plan: ShardPlan) -> dict:
    """A finished task's record; a failed task (after Ray's retries) is one clear line.

    A bad *input* never fails a task (it is rejected with a reason); what does
    is the machine: a full disk, an unwritable --out, a lost node.
    """
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        raise UserError(f"shard {plan.name} failed: {type(cause).__name__}: {cause}") from error
    except ray.exceptions.RayError as error:
        raise UserError(f"shard {plan.name} failed: {type(error).__name__}: {error}") from error
