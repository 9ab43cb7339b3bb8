"""A whole training run: :func:`train` starts the processes, :func:`train_worker` runs one.

Each process builds the network on its device (both columns' devices for
``--parallel columns``), wraps it for DDP when there are several processes,
gets its loaders from :func:`trainer.data.make_loaders` (or the
``make_loaders`` passed in, e.g. a test's synthetic loader), restores the
checkpoint on ``--resume`` and hands over to :func:`trainer.engine.fit`.
Rank 0 writes RUN/config.json, metrics.jsonl, curves.png and checkpoint.pt.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from torch import nn

from shards.atomic import remove_temporaries
from shards.errors import UserError
from shards.manifest import write_json_atomic
from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from trainer.columns import ColumnAlexNet
from trainer.config import TrainConfig
from trainer.data import per_process_batch_size
from trainer.distributed import (
    DistributedContext,
    min_over_ranks,
    run_distributed,
    world_size_of,
)
from trainer.engine import fit
from trainer.health import DivergenceGuard
from trainer.metrics import METRICS_NAME, MetricsLog
from trainer.model import AlexNet
from trainer.schedule import create_schedule
from trainer.session import TrainingSession, check_resumable, restore_session

CONFIG_NAME = "config.json"

LoaderFactory = Callable[[TrainConfig, int, int], tuple[object, object | None]]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(config: TrainConfig) -> None:
    """Deterministic kernels when asked; otherwise let cuDNN pick the fastest."""
    if config.deterministic:
        # cuBLAS is deterministic only with a fixed workspace (set before its first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif config.device == "cuda":
        torch.backends.cudnn.benchmark = True


def column_devices(config: TrainConfig) -> tuple[str, str]:
    """The two columns' devices: two GPUs if there are, else both on one device."""
    if config.device != "cuda":
        return ("cpu", "cpu")
    if torch.cuda.device_count() >= 2:
        return ("cuda:0", "cuda:1")
    return ("cuda:0", "cuda:0")


def build_network(config: TrainConfig, context: DistributedContext) -> nn.Module:
    """The paper's net on this process's device, or split in two columns."""
    if config.parallel == "columns":
        return ColumnAlexNet(
            config.num_classes, config.dropout, config.width, devices=column_devices(config)
        )
    network = AlexNet(config.num_classes, config.dropout, config.width).to(context.device)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def wrap_for_training(
    network: nn.Module, config: TrainConfig, context: DistributedContext
) -> nn.Module:
    """What a training step calls: DDP over the processes, optionally compiled."""
    model = network
    if context.is_distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.local_rank] if config.device == "cuda" else None
        model = DistributedDataParallel(network, device_ids=device_ids)
    if config.compile:
        model = torch.compile(model)
    return model


def build_optimizer(network: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The paper's SGD: momentum 0.9, weight decay 5e-4 on every parameter."""
    return torch.optim.SGD(
        network.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def resolved_config_record(config: TrainConfig, context: DistributedContext) -> dict:
    """config.json: the fields plus what was decided at run time."""
    return {
        **config.to_dict(),
        "world_size": context.world_size,
        "per_process_batch_size": per_process_batch_size(config.batch_size, context.world_size),
        "torch_version": torch.__version__,
    }


def train_worker(
    context: DistributedContext, config: TrainConfig, make_loaders: LoaderFactory | None = None
) -> None:
    """Run the training of one process (rank ``context.rank``)."""
    from trainer import data

    make_loaders = make_loaders or data.make_loaders
    out_dir = Path(config.out_dir)
    configure_determinism(config)
    seed_everything(config.seed)  # the same initial weights on every rank
    network = build_network(config, context)
    model = wrap_for_training(network, config, context)
    optimizer = build_optimizer(network, config)
    schedule = create_schedule(config, optimizer)
    train_loader, val_loader = make_loaders(config, context.rank, context.world_size)
    seed_everything(config.seed + context.rank)  # but each rank its own dropout masks
    session = TrainingSession(
        config=config,
        context=context,
        network=network,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        train_loader=train_loader,
        val_loader=val_loader,
        out_dir=out_dir,
        steps_per_epoch=min_over_ranks(len(train_loader), context),
        metrics=MetricsLog(out_dir / METRICS_NAME) if context.is_main else None,
        guard=DivergenceGuard(network, config.num_classes, context.device),
    )
    if session.steps_per_epoch == 0:
        raise UserError("the train split gives no batch (fewer images than --batch-size?)")
    if config.resume:
        restore_session(session, load_checkpoint(out_dir / CHECKPOINT_NAME))
    if context.is_main:
        write_json_atomic(out_dir / CONFIG_NAME, resolved_config_record(config, context))
        if config.resume:
            session.metrics.keep_until(session.position.step)
        else:
            session.metrics.path.unlink(missing_ok=True)
    fit(session)


def prepare_run(config: TrainConfig) -> TrainConfig:
    """Check the run directory (and that a ``--resume`` can continue its checkpoint),
    and fill in what the shards and the batch decide (num_classes, lr)."""
    config = config.resolved()
    if config.parallel == "columns" and world_size_of(config.nproc) > 1:
        # Each process would put its two columns on cuda:0 and cuda:1, the same
        # devices as every other process of the node, and DDP then fails.
        raise UserError(
            "--parallel columns runs in one process (it uses two devices itself); "
            f"this run has {world_size_of(config.nproc)} (torchrun): use --parallel ddp"
        )
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if config.resume and not checkpoint_path.is_file():
        raise UserError(f"--resume: no {CHECKPOINT_NAME} in {out_dir}")
    if not config.resume and checkpoint_path.exists():
        raise UserError(
            f"{out_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if config.num_classes is None:
        from trainer.data import num_classes_in

        config = config.replace(num_classes=num_classes_in(config.shards_dir))
    if config.resume:
        # Here, not only in the processes: a refusal is then one line, before any start.
        check_resumable(load_checkpoint(checkpoint_path), config, world_size_of(config.nproc))
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir)  # a checkpoint half-written by a killed run
    # The global batch must divide over the processes: one line, before any starts.
    per_process_batch_size(config.batch_size, world_size_of(config.nproc))
    return config


def train(config: TrainConfig, make_loaders: LoaderFactory | None = None) -> TrainConfig:
    """Train as ``config`` says, in ``config.nproc`` processes (or torchrun's).

    ``make_loaders(config, rank, world_size) -> (train, val or None)``
    defaults to the shard loaders of :mod:`trainer.data`. Returns the
    resolved config.
    """
    config = prepare_run(config)
    run_distributed(train_worker, config.nproc, config.device, config, make_loaders)
    return config
