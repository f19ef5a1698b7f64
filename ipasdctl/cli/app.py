"""The Typer application every command module adds its commands to."""

from typing import Annotated

import typer

app = typer.Typer(
    name="ipasdctl",
    help="Train compact image classifiers with IPASD self-distillation, compare them with other "
         "self-distillation methods, report, and export to ONNX.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    """--version: this package's version and the installed torch's, read from package metadata (no import)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    typer.echo(f"ipasdctl {__version__} (torch {torch_version})")
    raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """The options that come before the command (--version)."""
