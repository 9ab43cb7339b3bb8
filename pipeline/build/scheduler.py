"""Running shard tasks on Ray: one task per shard, a bounded number in flight.

Each shard is a pure function of its plan, so which worker or node runs it
changes nothing in the output.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

from pipeline.build.plan import ShardPlan
from pipeline.build.shard_task import run_shard
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
    cpus: int,
    on_done: Callable[[ShardPlan, dict], None],
) -> None:
    """Run every plan once as a Ray task, at most ``2 * cpus`` at a time; call
    ``on_done(plan, record)`` as each finishes.

    Ray must be ready (``ray_runtime.ray_session``, which says ``cpus``).
    If a task fails, no new one starts; the ones in flight are waited for
    (their temporaries are gone when they end, and a finished one is kept),
    then the first failure is raised: an ``OSError`` of a task as it is (a
    full disk, an unwritable --out), anything else as one line.

    Every ObjectRef lives in this frame only and is dropped before it returns
    or raises, so none outlives the Ray session (a reference released while
    Ray shuts down can make Ray end the process).
    """
    import ray

    # SPREAD: shard tasks are uniform and I/O-heavy; packing them onto the
    # driver's node would leave the rest of a cluster idle.
    remote_run = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(
        _run_shard_on_ray
    )
    transform_ref = ray.put(transform_config)
    pending_plans, out_dir = collections.deque(plans), Path(out_dir).resolve()
    # Bounded submission keeps the driver's memory flat on huge builds.
    window = max(2 * cpus, 4)
    in_flight: dict = {}
    done: list = []
    ref = None
    failure: BaseException | None = None
    try:
        while pending_plans or in_flight:
            while pending_plans and len(in_flight) < window:  # emptied by a failure
                plan = pending_plans.popleft()
                in_flight[remote_run.remote(plan, transform_ref, str(out_dir))] = plan
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                plan = in_flight.pop(ref)
                try:
                    record = _result_of(ray, ref, plan)
                except (OSError, UserError) as error:
                    failure = failure or error
                    pending_plans.clear()
                else:
                    on_done(plan, record)
        if failure is not None:
            raise failure
    finally:
        in_flight.clear()
        done = _ = ref = transform_ref = failure = None


def _result_of(ray, ref, plan: ShardPlan) -> dict:
    """A finished task's record; a failed task (after Ray's retries) raises.

    A bad *input* never fails a task (it is rejected with a reason); what does
    is the machine: a full disk, an unwritable --out (an ``OSError``, raised
    as it is so that the build can say which), a lost node (one line).
    """
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        if isinstance(cause, OSError):
            raise cause from None
        raise UserError(f"shard {plan.name} failed: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayError as error:
        raise UserError(f"shard {plan.name} failed: {type(error).__name__}: {error}") from None
