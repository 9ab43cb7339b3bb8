"""The `alexpipe` command line: a thin click group.

Each command lives in ``alexpipe/commands/<topic>.py``, parses its options,
builds a frozen config and calls one library function. This module only
registers them and turns known errors into one-line messages.
"""

from __future__ import annotations

import importlib

import click

from alexpipe import __version__

# (module, command names) — imported lazily so `alexpipe --help` stays fast
# and a command's heavy dependencies load only when it runs.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "doctor": ("alexpipe.commands.doctor", "doctor"),
    "sample": ("alexpipe.commands.sample", "sample"),
    "build-shards": ("alexpipe.commands.build", "build_shards"),
    "verify": ("alexpipe.commands.build", "verify"),
    "stats": ("alexpipe.commands.build", "stats"),
    "preview": ("alexpipe.commands.loader", "preview"),
    "bench-loader": ("alexpipe.commands.loader", "bench_loader"),
    "train": ("alexpipe.commands.train", "train"),
    "eval": ("alexpipe.commands.train", "eval_command"),
    "demo": ("alexpipe.commands.demo", "demo"),
}


class OneLineError(click.ClickException):
    """A known error, shown as one line on stderr (exit status 1, or 2 for usage)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"alexpipe: error: {self.format_message()}", err=True)


def _one_line(error: BaseException) -> str:
    """The message for a known error: the user's words, not a traceback."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error) or type(error).__name__


class LazyGroup(click.Group):
    """A click group that imports a command's module only when it is used,
    and reports bad input (UserError, missing files) as one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMAND_MODULES.get(name)
        if entry is None:
            return None
        module, attribute = entry
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        from shards.errors import UserError

        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            # Click's three-line usage block becomes one line with a pointer.
            command = error.ctx.command_path if error.ctx else "alexpipe"
            message = f"{error.format_message()} (see '{command} --help')"
            raise OneLineError(message, exit_code=2) from error
        except (
            UserError,
            FileNotFoundError,
            NotADirectoryError,
            IsADirectoryError,
            PermissionError,
        ) as error:
            if (ctx.obj or {}).get("verbose"):
                raise
            raise OneLineError(_one_line(error)) from error


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alexpipe")
@click.option("--verbose", "-v", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """ImageNet shards, DALI loaders and the AlexNet trainer.

    \b
    Typical use:
      alexpipe build-shards --src /imagenet --out /data/shards
      alexpipe train --shards /data/shards --out runs/alexnet
    Start with `alexpipe doctor` when something is slow or missing.
    """
    ctx.obj = {"verbose": verbose}


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="alexpipe")


if __name__ == "__main__":
    main()
