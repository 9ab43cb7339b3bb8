"""`alexpipe train` and `alexpipe eval`: build a config, call the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.load.interface import BACKENDS, BAD_SAMPLE_POLICIES, DEVICES
from shards.errors import UserError

SHARDS_HELP = "Shard directory, or http(s)://, s3:// or pipe:COMMAND (staged through a cache)."
CACHE_DIR_HELP = "Local directory for remote shards (default: a temporary one)."
CACHE_SIZE_HELP = "Size limit of that cache, e.g. 50G (default: twice the minimum)."


@click.command("train")
@click.option("--shards", "shards_dir", required=True, help=SHARDS_HELP)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Run directory.")
@click.option("--epochs", default=90, show_default=True)
@click.option("--batch-size", default=128, show_default=True, help="Global batch size.")
@click.option(
    "--lr",
    type=float,
    help="Learning rate. Default: the paper's per-sample rate, 0.01 x global batch / 128 "
    "(0.0025 at 32, 0.08 at 1024); the value used is in RUN/config.json.",
)
@click.option("--device", type=click.Choice(DEVICES), help="Default: cuda if available.")
@click.option("--backend", type=click.Choice(BACKENDS), default="dali", show_default=True)
@click.option("--parallel", type=click.Choice(["ddp", "columns"]), default="ddp", show_default=True)
@click.option("--nproc", default=1, show_default=True, help="Local processes (one per GPU).")
@click.option("--resume", is_flag=True, help="Continue from RUN/checkpoint.pt.")
@click.option("--max-steps", type=int, help="Stop after this optimizer step.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N steps.")
@click.option(
    "--schedule", type=click.Choice(["plateau", "step"]), default="plateau", show_default=True
)
@click.option("--lighting-std", default=0.1, show_default=True)
@click.option(
    "--normalize", type=click.Choice(["paper", "channel"]), default="paper", show_default=True
)
@click.option("--seed", default=0, show_default=True)
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--width", default=1.0, show_default=True, help="Layer width (1.0 = the paper).")
@click.option("--log-every", default=10, show_default=True, help="Steps per metrics row.")
@click.option("--num-threads", default=2, show_default=True, help="Loader threads per process.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help=CACHE_DIR_HELP + " Each process uses CACHE_DIR/rank-N.",
)
@click.option("--cache-size", help=CACHE_SIZE_HELP + " Split among a node's processes.")
@click.option(
    "--on-bad-sample",
    type=click.Choice(BAD_SAMPLE_POLICIES),
    default="stop",
    show_default=True,
    help="A sample that does not decode: stop with one line naming it, or skip it "
    "(a row of metrics.jsonl per skip).",
)
def train(compile_model: bool, device: str | None, **options) -> None:
    """Train AlexNet on a shard directory (the paper's recipe by default)."""
    from trainer.config import TrainConfig, default_device
    from trainer.metrics import METRICS_NAME, skipped_summary
    from trainer.run import train as run_training

    config = TrainConfig(device=device or default_device(), compile=compile_model, **options)
    resolved = run_training(config)
    click.echo(f"run directory: {resolved.out_dir} (config.json, checkpoint.pt, metrics.jsonl)")
    summary = skipped_summary(Path(resolved.out_dir) / METRICS_NAME, resolved.shards_dir)
    if summary:
        click.echo(summary)


@click.command("eval")
@click.option("--shards", "shards_dir", required=True, help=SHARDS_HELP)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path())
@click.option("--ten-crop", is_flag=True, help="Average the softmax of the paper's 10 patches.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--device", type=click.Choice(DEVICES), help="Default: cuda if available.")
@click.option("--backend", type=click.Choice(BACKENDS), default="dali", show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_DIR_HELP)
@click.option("--cache-size", help=CACHE_SIZE_HELP)
def eval_command(
    shards_dir: str,
    checkpoint_path: str,
    ten_crop: bool,
    as_json: bool,
    device: str | None,
    backend: str,
    batch_size: int,
    cache_dir: str | None,
    cache_size: str | None,
) -> None:
    """Top-1/top-5 error of a checkpoint on the val split."""
    from trainer.evaluation import evaluate_checkpoint

    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    results = evaluate_checkpoint(
        shards_dir,
        checkpoint_path,
        ten_crop=ten_crop,
        backend=backend,
        device=device,
        batch_size=batch_size,
        cache_dir=cache_dir,
        cache_size=cache_size,
    )
    summary = {key: results[key] for key in ("top1_err", "top5_err", "num_images")}
    if as_json:
        click.echo(json.dumps(summary))
        return
    crops = "ten-crop" if ten_crop else "center crop"
    click.echo(
        f"top-1 error {summary['top1_err']:.2%}, top-5 error {summary['top5_err']:.2%} "
        f"on {summary['num_images']} val images ({crops})"
    )
