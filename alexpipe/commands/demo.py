"""`alexpipe demo`: sample -> build-shards -> train -> eval, on CPU."""

from pathlib import Path

import click


@click.command()
@click.option(
    "--workdir",
    default="demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the sample, shards and run go (kept; a rerun resumes).",
)
@click.option("--epochs", default=12, show_default=True, help="Training epochs.")
@click.option(
    "--backend",
    default="dali",
    show_default=True,
    type=click.Choice(["dali", "torch"]),
    help="Loader backend.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Seed of the sample, the build and the training (another seed: another --workdir).",
)
def demo(workdir: Path, epochs: int, backend: str, seed: int) -> None:
    """Run the whole pipeline on a built-in ILSVRC-like sample, on CPU.

    Takes a few minutes on 2 cores and ends with the val error of the
    trained network next to chance, and where every output is.
    """
    from alexpipe.demo import DemoConfig, run_demo

    config = DemoConfig(workdir=workdir, epochs=epochs, backend=backend, seed=seed)
    result = run_demo(config, say=click.echo)
    click.echo(
        f"\nval error with ten-crop: top-1 {result.top1_err:.1%}, top-5 {result.top5_err:.1%} "
        f"(chance top-1 {result.chance_top1_err:.1%}); {result.seconds / 60:.1f} min in all"
    )
    click.echo(f"  raw sample:  {result.sample_dir}")
    click.echo(f"  shards:      {result.shards_dir}  (mean.png, stats.json, manifest.json)")
    click.echo(f"  run:         {result.run_dir}  (curves.png, metrics.jsonl, checkpoint.pt)")
    click.echo(f"  look at the augmentation: alexpipe preview {result.shards_dir} --out grid.png")
