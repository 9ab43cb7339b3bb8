"""Running shards in forked processes while a local Ray instance starts.

Starting Ray takes seconds (it waits for its own daemons to come up) during
which the CPUs would be mostly idle. These processes use that time.

Processes, not threads: ``ray.init`` holds the driver's GIL for about a
second while its core worker connects, and threads lose about a fifth of
their speed to the GIL anyway. They are forked before Ray is imported (so
no Ray thread is copied into them) and start in milliseconds because the
driver has already imported the kernel. Each shard is a pure function of
its plan, so who runs it changes nothing in the output.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pipeline.build.plan import ShardPlan
from pipeline.build.shard_task import run_shard
from shards.errors import UserError

# Records of shards run here say so: their peak RSS is the driver's (forked
# pages: the listing, the plan), not a worker's.
RAN_IN_DRIVER = "driver"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a `kill -9` of the driver alone must not leave us running."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own checks remain
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class WarmUpProcesses:
    """``count`` forked processes taking plans from ``plans`` until stopped.

    Exactly ``count`` shards are in flight at any time, so stopping leaves
    nothing queued: the running shards finish, the rest stay in ``plans``
    for Ray.
    """

    def __init__(self, plans: collections.deque, transform_config, out_dir: Path, count: int):
        self.plans = plans
        self.transform_config = transform_config
        self.out_dir = out_dir
        self.count = count
        self.finished: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        if self.count < 1:
            return
        self._pool = ProcessPoolExecutor(
            self.count,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        )
        with self._lock:
            for _ in range(self.count):
                self._submit_next()

    def stop(self) -> None:
        """Take no new plans; the running ones finish (see :meth:`join`)."""
        self._stopped.set()

    def alive(self) -> bool:
        with self._lock:
            return self._in_flight > 0

    def join(self, timeout: float | None = None) -> None:
        """Wait until no shard runs here (or ``timeout``); shut the pool once idle."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout)
            idle = self._in_flight == 0
        if idle and self._pool is not None and self._stopped.is_set():
            self._pool.shutdown(wait=True)
            self._pool = None

    def drain(self) -> Iterator[tuple[ShardPlan, dict]]:
        while True:
            try:
                yield self.finished.get_nowait()
            except queue.Empty:
                return

    def _submit_next(self) -> None:
        """Start the next plan (caller holds the lock)."""
        if self._stopped.is_set() or self.error is not None:
            return
        try:
            plan = self.plans.popleft()
        except IndexError:
            return
        future = self._pool.submit(run_shard, plan, self.transform_config, self.out_dir)
        self._in_flight += 1
        future.add_done_callback(lambda done, plan=plan: self._finished(plan, done))

    def _finished(self, plan: ShardPlan, future: Future) -> None:
        with self._lock:
            self._in_flight -= 1
            try:
                record = future.result()
            except BrokenProcessPool as error:  # killed (OOM killer, a signal)
                self._fail(UserError(f"shard {plan.name} failed: its process died ({error})"))
            except BaseException as error:  # re-raised in the driver's thread
                self._fail(error)
            else:
                self.finished.put((plan, dict(record, ran_in=RAN_IN_DRIVER)))
                self._submit_next()
            self._idle.notify_all()

    def _fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self._stopped.set()
