"""`alexpipe sample`: write a small, deterministic ImageNet-shaped dataset."""

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New directory.")
@click.option("--layout", default="folder", show_default=True, help="folder, tars or kaggle.")
@click.option("--classes", default=10, show_default=True, help="Number of classes.")
@click.option("--train-per-class", default=40, show_default=True, help="Train images per class.")
@click.option("--val-per-class", default=10, show_default=True, help="Val images per class.")
@click.option("--odd-files", is_flag=True, help="Add CMYK, PNG-as-JPEG, truncated, ... files.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
# Not for users: tests shrink images to run fast.
@click.option("--image-scale", default=1.0, hidden=True)
def sample(
    out: Path,
    layout: str,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    odd_files: bool,
    seed: int,
    image_scale: float,
) -> None:
    """Write a sample dataset in the folder, tars or kaggle layout.

    Images are synthetic but learnable (each class has its own hue, texture
    and shape) and of realistic sizes; the same options give the same bytes.
    """
    from tqdm import tqdm

    from alexpipe.sample import SampleConfig, check_sample, write_sample

    config = SampleConfig(
        out=out,
        layout=layout,
        classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        odd_files=odd_files,
        seed=seed,
        image_scale=image_scale,
    )
    plan = check_sample(config)  # bad input fails before the progress bar shows
    with tqdm(total=len(plan.items), unit="img", desc="sample", leave=False) as progress:
        summary = write_sample(config, on_image=progress.update, plan=plan)
    click.echo(summary.describe())
