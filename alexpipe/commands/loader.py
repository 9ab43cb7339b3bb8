"""`alexpipe bench-loader` and `alexpipe preview`: look at the online loaders from outside."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from pipeline.load.interface import BACKENDS, DEVICES
from shards.manifest import SPLITS

TILE_GAP = 4  # pixels between preview tiles


@click.command("bench-loader")
@click.option(
    "--shards",
    "shards_dir",
    required=True,
    help="Shard directory written by build-shards, or http(s)://, s3://, pipe:COMMAND "
    "(staged through a temporary verified cache).",
)
@click.option("--backend", type=click.Choice(BACKENDS), default="dali", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@click.option(
    "--batches",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Batches to time (after two warm-up batches).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--num-threads", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_loader(shards_dir, backend, device, split, batches, batch_size, num_threads, as_json):
    """Measure a loader's images/s on real shards, as the trainer would consume it."""
    from pipeline.load.loader import create_loader
    from pipeline.load.loader_tools import measure_throughput

    loader = create_loader(
        shards_dir,
        split,
        batch_size=batch_size,
        backend=backend,
        device=device,
        num_threads=num_threads,
    )
    report = {
        "backend": backend,
        "device": device,
        "split": split,
        "batch_size": batch_size,
        "num_threads": num_threads,
        **measure_throughput(loader, batches),
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"{backend}/{device} {split}: {report['img_per_s']:.0f} img/s "
        f"({report['images']} images in {report['seconds']:.2f} s, batch {batch_size}, "
        f"{num_threads} threads)"
    )


@click.command()
@click.argument("shards_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="PNG file to write.",
)
@click.option("--count", type=click.IntRange(min=1, max=256), default=16, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="dali", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lighting-std", type=click.FloatRange(min=0), default=0.1, show_default=True)
def preview(shards_dir, out, count, backend, seed, lighting_std):
    """Write a grid of augmented train crops (crop, flip, lighting), denormalized."""
    from PIL import Image

    from pipeline.load.loader_tools import preview_images

    images = preview_images(
        shards_dir, count, seed=seed, backend=backend, lighting_std=lighting_std
    )
    Image.fromarray(tile_grid(images)).save(out)
    click.echo(f"wrote {len(images)} train crops to {out}")


def tile_grid(images, columns: int | None = None):
    """N×H×W×3 uint8 -> one image, tiles left to right, top to bottom, white gaps."""
    import numpy as np

    count, height, width, _ = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * (height + TILE_GAP) - TILE_GAP, columns * (width + TILE_GAP) - TILE_GAP, 3),
        255,
        np.uint8,
    )
    for number, image in enumerate(images):
        top, left = divmod(number, columns)
        top, left = top * (height + TILE_GAP), left * (width + TILE_GAP)
        grid[top : top + height, left : left + width] = image
    return grid
