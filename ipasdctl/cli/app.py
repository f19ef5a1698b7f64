"""The Typer application every command module adds its commands to, and how its help reads: commands listed
in the order they chain, each summarised by its first whole sentence, arguments by their metavars."""

from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

# the order of `ipasdctl --help`: the order the commands chain in (train ... export bench report), then the rest
COMMAND_ORDER = ("train", "tune", "compare", "prune", "eval", "calibrate", "export", "bench", "report", "predict",
                 "list")


def first_sentence(text: str) -> str:
    """The first sentence of a docstring, to its first period; a clause before a '; ' (outside parentheses)
    stands for it when there is one: whole words, never cut in the middle."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    depth, end = 0, len(paragraph)
    for i, char in enumerate(paragraph):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and paragraph[i:i + 2] in (". ", "; "):
            end = i
            break
    return paragraph[:end].rstrip(".;") + "." if paragraph else ""


class Command(TyperCommand):
    """A command whose summary in `ipasdctl --help` is a whole sentence (click cuts it at 45 characters) and
    whose arguments read as their metavars (`IMAGE...`, not `{IMAGE...}...` and `<list[Path]>`)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return first_sentence(self.help or "")

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            pieces += [argument_name(param)] if param.param_type_name == "argument" else param.get_usage_pieces(ctx)
        return pieces

    def format_options(self, ctx, formatter) -> None:
        arguments = [(argument_name(p).strip("[]"), p.get_help_record(ctx)[1]) for p in self.get_params(ctx)
                     if p.param_type_name == "argument"]
        options = [p.get_help_record(ctx) for p in self.get_params(ctx) if p.param_type_name == "option"]
        for title, rows in (("Arguments", arguments), ("Options", [r for r in options if r is not None])):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def argument_name(param) -> str:
    """An argument as the usage line shows it: its metavar as written, else its NAME (in [] when optional)."""
    if param.metavar:
        return param.metavar
    name = param.name.upper() + ("..." if param.nargs != 1 else "")
    return name if param.required else f"[{name}]"


class Group(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        known = [name for name in COMMAND_ORDER if name in self.commands]
        return known + [name for name in self.commands if name not in known]


class App(typer.Typer):
    """typer.Typer whose commands are `Command`s."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = App(
    name="ipasdctl",
    cls=Group,
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
