"""`build-shards`, `verify` and `stats`: making and checking a shard directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from shards.errors import UserError
from shards.manifest import Layout, Manifest


def _splits(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@click.command("build-shards")
@click.option(
    "--src",
    required=True,
    type=click.Path(path_type=Path),
    help="Raw ILSVRC: a folder tree, the official tars, or the Kaggle layout.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory for shards, statistics and manifest.",
)
@click.option(
    "--layout",
    default="auto",
    show_default=True,
    type=click.Choice([layout.value for layout in Layout]),
    help="Input layout; auto-detected by default.",
)
@click.option("--size", default=256, show_default=True, help="Stored image side (pixels).")
@click.option("--quality", default=90, show_default=True, help="JPEG quality of stored images.")
@click.option(
    "--resize",
    default="center-crop",
    show_default=True,
    type=click.Choice(["center-crop", "squash"]),
    help="center-crop: shorter side to SIZE, central crop (the paper); "
    "squash: resize to SIZE x SIZE ignoring aspect.",
)
@click.option("--shard-size", default=1000, show_default=True, help="Images per shard.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Local Ray workers (default: all cores). Ignored with --address.",
)
@click.option(
    "--address", default=None, help="Join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT."
)
@click.option("--splits", default="train,val", show_default=True, help="Splits to build.")
@click.option("--seed", default=0, show_default=True, help="Seed of the train shard permutation.")
@click.option(
    "--max-rejected",
    default=0.001,
    show_default=True,
    help="Exit non-zero if more than this fraction of a split is rejected.",
)
@click.option(
    "--exif-transpose",
    is_flag=True,
    help="Apply EXIF orientation (off by default, like torchvision).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def build_shards(
    src,
    out,
    layout,
    size,
    quality,
    resize,
    shard_size,
    workers,
    address,
    splits,
    seed,
    max_rejected,
    exif_transpose,
    no_progress,
):
    """Rescale ILSVRC to SIZE x SIZE JPEG shards with mean image and RGB PCA.

    Resumable: run the same command again after a crash or kill and only the
    missing shards are made; the result is byte-identical to an
    uninterrupted build.
    """
    from pipeline.build.config import BuildConfig
    from pipeline.build.job import build_shards as run_build

    config = BuildConfig(
        src=src,
        out=out,
        layout=layout,
        size=size,
        quality=quality,
        resize=resize,
        shard_size=shard_size,
        seed=seed,
        splits=_splits(splits),
        max_rejected=max_rejected,
        exif_transpose=exif_transpose,
        workers=workers,
        address=address,
        progress=not no_progress,
    )
    summary = run_build(config)
    if summary.already_complete:
        click.echo(f"{out} is already complete ({summary.num_shards} shards); nothing to do.")
    else:
        click.echo(
            f"built {summary.num_shards} shards in {summary.wall_seconds:.1f} s "
            f"({summary.images_processed} images, {summary.images_per_second:.1f} img/s; "
            f"{summary.shards_skipped} shards kept from an earlier run; "
            f"{summary.ray_nodes_used} Ray node(s); "
            f"peak worker RSS {summary.peak_worker_rss_mb:.0f} MB)"
        )
    for split, split_summary in summary.splits.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in split_summary.rejected_by_reason.items())
        click.echo(
            f"  {split}: {split_summary.num_samples} images"
            f"{f', rejected {reasons}' if reasons else ''}"
        )
    click.echo(f"output: {out}")
    problems = summary.over_rejection_limit(max_rejected)
    if problems:
        raise UserError("; ".join(problems))


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--decode", is_flag=True, help="Also decode every image and check its size.")
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild the shards that fail from --src, byte-identical to a clean build, "
    "then verify again.",
)
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    default=None,
    help="With --repair: the raw ILSVRC that DIRECTORY was built from.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Processes that check shards, and Ray workers that rebuild them (default: all cores).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def verify(directory, decode, repair, src, workers, no_progress):
    """Check a shard directory against its manifest (sizes, sha256, index files, samples).

    Exits 1 and lists what is wrong on any mismatch. With --repair --src SRC,
    the failing shards are made again from SRC (refused if SRC is not what
    DIRECTORY was built from), put in place, and the directory verified again.
    """
    from shards.remote import read_manifest

    if repair != (src is not None):
        raise UserError(
            "--repair and --src SRC go together: alexpipe verify DIR --repair --src SRC"
        )
    manifest = read_manifest(directory)
    report = _checked(directory, manifest, decode, workers, not no_progress)
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    if report.failing_shards and repair:
        from pipeline.build.repair import RepairConfig, repair_shards

        config = RepairConfig(shards_dir=directory, src=src, workers=workers)
        for name in repair_shards(config, report):
            click.echo(f"rebuilt {name}")
        report = _checked(directory, manifest, decode, workers, not no_progress)
        for problem in report.problems:
            click.echo(f"FAIL {problem}", err=True)
    if report.problems:
        hint = ""
        if report.failing_shards and not repair:
            hint = (
                f"; to rebuild the failing shards: alexpipe verify {directory} --repair --src SRC"
            )
        raise UserError(f"{len(report.problems)} problem(s) in {directory}{hint}")
    click.echo(f"OK {directory}")


def _checked(directory: Path, manifest: Manifest, decode: bool, workers, progress: bool):
    """``verify_directory`` with a progress bar in bytes."""
    from tqdm import tqdm

    from shards.verify import verify_directory

    sizes = {info.file: info.bytes for info in manifest.every_shard()}
    with tqdm(
        total=sum(sizes.values()),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="verify",
        dynamic_ncols=True,
        disable=not progress,
    ) as bar:
        return verify_directory(
            directory,
            decode=decode,
            progress=lambda name: bar.update(sizes[name]),
            manifest=manifest,
            workers=workers,
        )


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print stats.json as it is.")
def stats(directory, as_json):
    """Print the dataset statistics (mean, std, RGB PCA) readably."""
    from shards.remote import LocalSource, read_manifest, read_stats

    manifest = read_manifest(directory)
    values = read_stats(LocalSource(directory), manifest)
    if as_json:
        click.echo(json.dumps(values, indent=2))
        return
    click.echo(
        f"{values['num_images']} train images, {values['num_pixels']} pixels "
        f"(scale {values['scale']})"
    )
    click.echo("           R         G         B")
    click.echo("mean " + "".join(f"{v:10.3f}" for v in values["mean_rgb"]))
    click.echo("std  " + "".join(f"{v:10.3f}" for v in values["std_rgb"]))
    click.echo("PCA (eigenvalue: eigenvector R G B)")
    for k, eigenvalue in enumerate(values["eigvals"]):
        vector = [row[k] for row in values["eigvecs"]]
        click.echo(f"  {eigenvalue:10.3f}: " + " ".join(f"{v:+.4f}" for v in vector))
