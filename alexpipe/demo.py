"""`alexpipe demo`: the whole product on a built-in sample, on CPU, in minutes.

sample (official tar layout) -> build-shards (Ray) -> train (DALI on CPU) ->
eval (the paper's ten patches). Every step is the real library call a user
would make; each step is skipped when its output is already complete, so a
second `make demo` only repeats what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shards.errors import UserError


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so the run finishes in a few minutes on 2 cores, with a result
    that holds from seed to seed (README, "Quick start", gives the band).

    The network is the paper's AlexNet at a reduced width (all layers,
    LRN, overlapping pooling, dropout and the recipe unchanged) so that CPU
    training sees enough steps to learn the sample's classes. The rate is
    the trainer's default for the batch (the paper's per-sample rate), and
    it is divided by 10 for the last epochs (from ``lr_drop_epoch``), which
    settles the final error: at a constant rate it swings by tens of points
    from one epoch to the next. Training is deterministic (the same seed
    gives the same figures on the same machine).
    """

    workdir: Path
    classes: int = 10
    train_per_class: int = 60
    val_per_class: int = 10
    epochs: int = 12
    batch_size: int = 32
    lr: float | None = None  # None: 0.01 x batch / 128, the trainer's default
    lr_drop_epoch: int | None = None  # None: after two thirds of the epochs
    width: float = 0.125
    backend: str = "dali"
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    sample_dir: Path
    shards_dir: Path
    run_dir: Path
    top1_err: float
    top5_err: float
    chance_top1_err: float
    seconds: float


def run_demo(config: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    """Run the four steps; ``say`` reports progress in words."""
    from alexpipe.sample import SampleConfig, write_sample
    from pipeline.build.config import BuildConfig
    from pipeline.build.job import build_shards
    from trainer.checkpoint import CHECKPOINT_NAME
    from trainer.config import TrainConfig
    from trainer.evaluation import evaluate_checkpoint
    from trainer.run import train

    started = time.perf_counter()
    workdir = config.workdir
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} exists and is not a directory")
    sample_dir, shards_dir, run_dir = workdir / "ilsvrc", workdir / "shards", workdir / "run"
    done_marker = sample_dir / ".alexpipe-sample-complete"
    seed_record = f"seed {config.seed}"
    if done_marker.exists():
        # (An empty marker is an earlier version's, which always used seed 0.)
        recorded = done_marker.read_text(encoding="utf-8").strip() or "seed 0"
        if recorded != seed_record:
            raise UserError(
                f"--workdir {workdir} holds the demo of {recorded}, not {seed_record}; "
                "give another --workdir"
            )

    say(f"[1/4] sample: ILSVRC-like data, official tar layout -> {sample_dir}")
    if not done_marker.exists():
        if sample_dir.exists():
            import shutil

            shutil.rmtree(sample_dir)  # an interrupted sample: start it again
        write_sample(
            SampleConfig(
                out=sample_dir,
                layout="tars",
                classes=config.classes,
                train_per_class=config.train_per_class,
                val_per_class=config.val_per_class,
                seed=config.seed,
            )
        )
        done_marker.write_text(seed_record + "\n", encoding="utf-8")

    say(f"[2/4] build-shards: 256x256 shards, mean image and RGB PCA -> {shards_dir}")
    build_shards(BuildConfig(src=sample_dir, out=shards_dir, shard_size=100, seed=config.seed))

    say(f"[3/4] train: AlexNet (width {config.width}) on CPU, {config.backend} loader -> {run_dir}")
    checkpoint = run_dir / CHECKPOINT_NAME
    train_config = TrainConfig(
        shards_dir=str(shards_dir),
        out_dir=str(run_dir),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        width=config.width,
        device="cpu",
        backend=config.backend,
        schedule="step",
        step_epochs=config.lr_drop_epoch or max(1, config.epochs * 2 // 3),
        max_lr_reductions=1,
        seed=config.seed,
        deterministic=True,
        resume=checkpoint.exists(),
        log_every=5,
    )
    train(train_config)

    say("[4/4] eval: top-1/top-5 error on val, averaging the paper's ten patches")
    result = evaluate_checkpoint(
        shards_dir,
        checkpoint,
        ten_crop=True,
        backend=config.backend,
        device="cpu",
        batch_size=config.batch_size,
    )
    return DemoResult(
        sample_dir=sample_dir,
        shards_dir=shards_dir,
        run_dir=run_dir,
        top1_err=result["top1_err"],
        top5_err=result["top5_err"],
        chance_top1_err=1 - 1 / config.classes,
        seconds=time.perf_counter() - started,
    )
