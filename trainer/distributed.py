"""Process groups: one process per device, started three ways.

- Under ``torchrun`` (one node or many) the rank, world size and local rank
  come from its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
  the group is joined through ``env://``.
- ``--nproc N`` on one machine starts N processes with
  ``torch.multiprocessing``. They meet through a file store in a private
  temporary directory, so nothing listens on a network port for the
  rendezvous, and gloo/NCCL are pinned to the loopback interface.
- Otherwise one process, no process group at all.

NCCL on GPUs, gloo on CPUs. :func:`run_distributed` hides the three cases
behind one call that hands the worker a :class:`DistributedContext`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from shards.errors import UserError

LOOPBACK = "127.0.0.1"
# After one --nproc process fails, how long the others get to end by themselves.
SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the world, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # "cpu" or "cuda:<local_rank>"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size_of(nproc: int) -> int:
    """The number of processes a run with ``--nproc nproc`` will have (torchrun's, under it)."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc


def backend_for(device_kind: str) -> str:
    return "nccl" if device_kind == "cuda" else "gloo"


def _device_for(device_kind: str, local_rank: int) -> str:
    if device_kind != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu)")
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"process {local_rank} needs a GPU but only {torch.cuda.device_count()} are visible"
        )
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def context_from_env(device_kind: str) -> DistributedContext:
    """Join the process group described by torchrun's environment."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(device_kind, local_rank)
    if world_size > 1:
        dist.init_process_group(backend_for(device_kind), init_method="env://")
    return DistributedContext(rank, world_size, local_rank, device)


def pin_to_loopback() -> None:
    """Keep local process groups off the network (set before the group exists)."""
    os.environ.setdefault("MASTER_ADDR", LOOPBACK)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def context_from_store(
    rank: int, world_size: int, store_path: str, device_kind: str
) -> DistributedContext:
    """Join a local process group that meets through the file ``store_path``."""
    pin_to_loopback()
    device = _device_for(device_kind, rank)
    if device_kind != "cuda":
        # N CPU processes share the cores instead of each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend_for(device_kind), store=store, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, rank, device)


def _error_file(directory: str, rank: int) -> Path:
    return Path(directory) / f"error-{rank}.txt"


def _spawned(rank: int, worker: Callable, world_size: int, directory: str, device_kind: str, args):
    """One process of a ``--nproc`` run. A UserError is left for the parent to report
    as one line (in the run's private directory), instead of a traceback from here."""
    try:
        context = context_from_store(rank, world_size, str(Path(directory) / "store"), device_kind)
        try:
            worker(context, *args)
        finally:
            shutdown()
    except UserError as error:
        _error_file(directory, rank).write_text(str(error), encoding="utf-8")
        sys.exit(1)


def _failure(error: Exception, directory: str, nproc: int) -> Exception:
    """What a failed ``--nproc`` run raises: the first UserError of any process, or else
    a one-line UserError for a process that died (its own output says why), or else
    torch's exception with the traceback of an unexpected error."""
    for rank in range(nproc):
        path = _error_file(directory, rank)
        if path.is_file():
            return UserError(path.read_text(encoding="utf-8"))
    if isinstance(error, ProcessExitedException):
        return UserError(f"training process {error.error_index} failed (see the message above)")
    return error


def run_distributed(worker: Callable, nproc: int, device_kind: str, *args) -> None:
    """Call ``worker(context, *args)`` in every process of the run.

    Under torchrun: in this process, with torchrun's rank and world size.
    With ``nproc`` > 1: in ``nproc`` new local processes (``worker`` and
    ``args`` must be picklable); a UserError in any of them is raised here.
    Otherwise in this process, alone.
    """
    if under_torchrun():
        if nproc > 1:
            raise UserError("under torchrun, start processes with --nproc_per_node, not --nproc")
        context = context_from_env(device_kind)
        try:
            worker(context, *args)
        finally:
            shutdown()
        return
    if nproc == 1:
        worker(DistributedContext(device=_device_for(device_kind, 0)), *args)
        return
    if device_kind == "cuda" and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="alexpipe-rendezvous-") as directory:
        processes = multiprocessing.spawn(
            _spawned,
            args=(worker, nproc, directory, device_kind, args),
            nprocs=nproc,
            join=False,
        )
        # When one process fails torch stops the others, and says so as a warning: noise
        # next to the one line that explains the failure.
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        try:
            while not processes.join(grace_period=SHUTDOWN_GRACE_SECONDS):
                pass
        except (ProcessExitedException, ProcessRaisedException) as error:
            failure = _failure(error, directory, nproc)
            if failure is error:
                raise
            raise failure from None
        finally:
            spawn_log.setLevel(level)


def shutdown() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The elementwise minimum of ``tensor`` over all ranks, in place; returns it."""
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def min_over_ranks(value: int, context: DistributedContext) -> int:
    """The smallest ``value`` of all ranks (e.g. batches per epoch)."""
    if not context.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=context.device)
    return int(all_reduce_min(tensor, context).item())


def gather_objects(obj, context: DistributedContext) -> list:
    """Every rank's ``obj``, indexed by rank (collective: all ranks must call)."""
    if not context.is_distributed:
        return [obj]
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
