"""`alexpipe doctor`: the first thing to run when something is slow."""

import click


@click.command()
def doctor() -> None:
    """Print versions, the active PIL build (Pillow-SIMD?), DALI, CPU/GPU, Ray."""
    from alexpipe.doctor import report

    for name, value in report():
        click.echo(f"{name:>11}: {value}")
