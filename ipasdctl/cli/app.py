"""The Typer application every command module adds its commands to."""

import typer

app = typer.Typer(
    name="ipasdctl",
    help="Train compact image classifiers with IPASD self-distillation, compare them with other "
         "self-distillation methods, report, and export to ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
