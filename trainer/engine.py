"""The training loop: :func:`train_one_epoch`, :func:`evaluate`, :func:`fit`.

A loader is anything iterable over ``(images, labels)`` batches with a
``len()``: images float32 N×3×224×224 (N×10×3×224×224 for ten-crop
evaluation), labels int64. Data wait is timed by :func:`measure_batches`,
a generator around the loader, instead of timers in the loop body.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as functional
from torch import nn

from pipeline.load.interface import Loader, ResumableLoader, SkippingLoader
from trainer.checkpoint import restore_rng_state
from trainer.config import default_lr
from trainer.distributed import DistributedContext, all_reduce_sum, gather_objects
from trainer.health import Divergence, divergence_message
from trainer.metrics import CURVES_NAME, plot_curves
from trainer.schedule import end_epoch
from trainer.session import TrainingSession, save_session


def measure_batches(batches: Iterable) -> Iterator[tuple[object, float]]:
    """Yield ``(batch, wait_seconds)``: how long the loop was blocked on each batch.

    The time of ``iter()`` (an epoch's start-up) counts toward the first batch.
    """
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start
        start = time.perf_counter()


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device`` (no-op when the loader already put it there)."""
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool = False,
) -> torch.Tensor:
    """One SGD step on one batch; returns the (detached) mean cross-entropy loss."""
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)
    loss = functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _note_skipped(session: TrainingSession, loader, epoch: int | None = None) -> None:
    """Keep a row for each sample ``loader`` skipped since the last call (with
    ``--on-bad-sample skip``), at the step that stands now; ``epoch`` defaults to
    the one being trained (rows count epochs from 1)."""
    if not isinstance(loader, SkippingLoader):
        return
    step = session.position.step
    epoch = session.position.epoch + 1 if epoch is None else epoch
    session.skipped.extend(
        {"epoch": epoch, "step": step, "skipped": sample.as_row()}
        for sample in loader.take_skipped()
    )


def _write_skipped(session: TrainingSession, count: int | None = None) -> None:
    """Write every rank's rows of skipped samples to metrics.jsonl (a collective under DDP).

    ``count``: the number of rows over all ranks, if already summed (a
    training row sums it with the loss, so there is no collective on the
    way when nothing was skipped).
    """
    if count is None:
        total = torch.tensor([float(len(session.skipped))], device=session.device)
        count = int(all_reduce_sum(total, session.context).item())
    if count:
        rows = [row for rows in gather_objects(session.skipped, session.context) for row in rows]
        if session.metrics is not None:
            for row in sorted(rows, key=lambda row: row["step"]):
                session.metrics.append(row)
    session.skipped.clear()


def _log_training_row(session: TrainingSession, progress) -> float:
    """Write the metrics row of the steps since the last one; returns its loss
    (a collective under DDP)."""
    context, window = session.context, session.window
    loss_sum = torch.as_tensor(window.loss_sum, dtype=torch.float64, device=session.device)
    steps = torch.tensor(float(window.steps), dtype=torch.float64, device=session.device)
    skipped = torch.tensor(float(len(session.skipped)), dtype=torch.float64, device=session.device)
    totals = torch.stack([loss_sum, steps, skipped])
    all_reduce_sum(totals, context)  # mean over every rank's steps
    _write_skipped(session, count=int(totals[2].item()))
    loss = (totals[0] / totals[1]).item()
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    row = {
        "epoch": session.position.epoch + 1,
        "step": session.position.step,
        "loss": loss,
        "lr": session.optimizer.param_groups[0]["lr"],
        "img_per_s": window.images * context.world_size / elapsed,
        "data_wait_frac": min(1.0, window.wait_seconds / elapsed),
    }
    if session.metrics is not None:
        session.metrics.append(row)
    if progress is not None:
        progress.set_postfix(
            loss=f"{loss:.4f}",
            img_s=f"{row['img_per_s']:.0f}",
            wait=f"{row['data_wait_frac']:.0%}",
        )
    window.restart()
    return loss


def stop_if_diverged(session: TrainingSession, progress=None, loss: float | None = None) -> None:
    """Raise :class:`Divergence` if the steps since the last check show a run that can
    no longer learn (see :mod:`trainer.health`).

    Called after every metrics row (with its ``loss``) and before every
    checkpoint, so a diverged state never replaces the last good checkpoint.
    A stop between rows first writes the row of the steps since the last
    one, so metrics.jsonl ends at the step the message names. A collective
    under DDP: every rank reaches the same verdict.
    """
    guard = session.guard
    if guard is None:
        return
    problem = guard.problem(session.context)
    if problem is None:
        if loss is not None:
            guard.restart()  # this window was judged and written
        return
    if loss is None:
        loss = _log_training_row(session, progress)
    config = session.config
    lr = session.optimizer.param_groups[0]["lr"]
    raise Divergence(
        divergence_message(
            problem,
            session.position.step,
            loss,
            lr,
            suggested_lr=min(default_lr(config.batch_size), lr / 4),
            kept_step=session.saved_step,
        )
    )


def _epoch_batches(session: TrainingSession) -> Iterable:
    """This epoch's remaining batches of the train loader."""
    loader = session.train_loader
    if not isinstance(loader, ResumableLoader) and isinstance(loader, Loader):
        loader.set_epoch(session.position.epoch)
    if session.skip_batches:
        skip, session.skip_batches = session.skip_batches, 0
        return itertools.islice(loader, skip, None)
    return loader


def _due_after(session: TrainingSession, step: int) -> tuple[bool, bool, bool]:
    """What follows ``step``, the next one (asked before it runs): a metrics row (every
    ``log_every`` steps and at the epoch's end), the stop at ``max_steps``, a checkpoint."""
    config, position = session.config, session.position
    row = step % config.log_every == 0 or position.batch_in_epoch + 1 == session.steps_per_epoch
    stop = config.max_steps is not None and step >= config.max_steps
    save = bool(config.checkpoint_every and step % config.checkpoint_every == 0)
    return row, stop, save


def train_one_epoch(session: TrainingSession) -> bool:
    """Train on the rest of the current epoch; True if ``max_steps`` stopped it early.

    Writes a training row every ``log_every`` steps and at the end of the
    epoch, and a checkpoint every ``checkpoint_every`` steps (the end of
    the epoch is checkpointed by :func:`fit`, after evaluation).
    """
    config, position, context = session.config, session.position, session.context
    session.model.train()
    progress = None
    if context.is_main and config.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=session.steps_per_epoch,
            initial=position.batch_in_epoch,
            desc=f"epoch {position.epoch + 1}/{config.epochs}",
            unit="batch",
            dynamic_ncols=True,
        )
    session.window.restart_timer()
    stopped = False
    try:
        for (images, labels), wait_seconds in measure_batches(_epoch_batches(session)):
            if position.batch_in_epoch >= session.steps_per_epoch:
                break  # this rank has more batches than the others: stay in step with them
            if session.pending_rng is not None:
                # Mid-epoch resume: the generators were saved with this epoch's
                # iteration already running, so they go back once it runs again.
                restore_rng_state(session.pending_rng)
                session.pending_rng = None
            images, labels = to_device(images, labels, session.device, config.channels_last)
            row_due, stop_due, save_due = _due_after(session, position.step + 1)
            if session.guard is not None and (row_due or stop_due or save_due):
                session.guard.arm()  # measure this step's activations for the check after it
            loss = train_step(session.model, session.optimizer, images, labels, config.bf16)
            position.step += 1
            if session.guard is not None:
                session.guard.observe(position.step, loss)
            position.batch_in_epoch += 1
            _note_skipped(session, session.train_loader)
            session.window.add(loss, images.shape[0], wait_seconds)
            if row_due:
                stop_if_diverged(session, progress, _log_training_row(session, progress))
            if progress is not None:
                progress.update(1)
            if position.batch_in_epoch == session.steps_per_epoch:
                break
            if stop_due or save_due:
                if not row_due:  # a row just written was judged and wrote the skipped rows
                    stop_if_diverged(session, progress)
                    _write_skipped(session)
                save_session(session)
                if stop_due:
                    stopped = True
                    break
                session.window.restart_timer()
    finally:
        if progress is not None:
            progress.close()
    return stopped


@torch.no_grad()
def evaluate(
    network: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    context: DistributedContext | None = None,
    bf16: bool = False,
    channels_last: bool = False,
) -> dict | None:
    """Top-1/top-5 error, mean loss and image count over ``loader`` (all ranks).

    Batches of N×10×3×224×224 are the paper's ten patches per image: their
    softmax outputs are averaged before the error and loss are taken.
    Returns None when the loader yields no images.
    """
    context = context or DistributedContext()
    device = torch.device(device)
    network.eval()
    # top-1 hits, top-5 hits, summed loss, images
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels, *_ in loader:
        images, labels = to_device(images, labels, device, channels_last=False)
        patches = images.shape[1] if images.dim() == 5 else 1
        flat = images.flatten(0, 1) if images.dim() == 5 else images
        if channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = network(flat)
        probabilities = functional.softmax(logits.float(), dim=1)
        probabilities = probabilities.view(labels.shape[0], patches, -1).mean(dim=1)
        log_probabilities = probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()
        k = min(5, log_probabilities.shape[1])
        hits = log_probabilities.topk(k, dim=1).indices == labels[:, None]
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += functional.nll_loss(log_probabilities, labels, reduction="sum").double()
        totals[3] += labels.shape[0]
    all_reduce_sum(totals, context)
    top1_hits, top5_hits, loss_sum, count = totals.tolist()
    if count == 0:
        return None
    return {
        "top1_err": 1.0 - top1_hits / count,
        "top5_err": 1.0 - top5_hits / count,
        "val_loss": loss_sum / count,
        "num_images": int(count),
    }


def fit(session: TrainingSession) -> None:
    """Train until ``epochs`` are done or ``max_steps`` is reached.

    After each epoch: evaluate (if there is a val loader), step the
    schedule, checkpoint, redraw curves.png.
    """
    config, position, context = session.config, session.position, session.context
    curves_step = None  # the step curves.png was last drawn at
    while position.epoch < config.epochs:
        if config.max_steps is not None and position.step >= config.max_steps:
            break
        if train_one_epoch(session):
            break
        position.epoch += 1
        position.batch_in_epoch = 0
        results = None
        if session.val_loader is not None:
            results = evaluate(
                session.network,
                session.val_loader,
                session.device,
                context,
                config.bf16,
                config.channels_last,
            )
            _note_skipped(session, session.val_loader, epoch=position.epoch)
            _write_skipped(session)
        if results is not None and session.metrics is not None:
            session.metrics.append(
                {
                    "epoch": position.epoch,
                    "step": position.step,
                    "top1_err": results["top1_err"],
                    "top5_err": results["top5_err"],
                    "val_loss": results["val_loss"],
                }
            )
        top1_err = results["top1_err"] if results is not None else None
        end_epoch(session.schedule, top1_err)
        save_session(session)
        curves_step = _draw_curves(session)
    if curves_step != position.step:
        _draw_curves(session)


def _draw_curves(session: TrainingSession) -> int:
    """Redraw curves.png (rank 0); returns the step it shows."""
    if session.metrics is not None and session.metrics.path.exists():
        plot_curves(session.metrics.path, session.out_dir / CURVES_NAME)
    return session.position.step
