"""Chained subcommands: `ipasdctl train ... export --onnx --int8 bench report` runs each command in order, each
taking the previous ones' output when its own input is left out.

The command line is split where a command's name stands in place of an option or argument of the command
before it (a value of an option never starts a link: `--name bench` is a name). Every link is parsed by its own
command before the first one runs, so a mistake in any of them is one line and exit 2 before anything trains.
Each command then runs as it does alone; what it made (the `Outputs` it returns) goes into the chain's
`Outputs`, which the next links read:

    train / compare  ->  run folders (and the comparison folder)
    export           ->  exported models (and their folder)      (default input: every run folder so far)
    bench            ->  latency tables                          (default input: every exported model)
    report / eval                                                (default input: the comparison, or the runs)

A chain is resumable: rerunning it skips finished runs (train reuses a finished run of the same name and
recipe; compare skips as always), exports whose source checkpoint is unchanged, and latencies already
measured on this CPU with the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import typer

from ..errors import UserError


@dataclass
class Outputs:
    """What a command made (its return value), and what the links of a chain have made so far."""

    run_dirs: list[Path] = field(default_factory=list)
    comparisons: list[Path] = field(default_factory=list)
    models: list[Path] = field(default_factory=list)
    exports_dir: Optional[Path] = None
    latency_tables: list[Path] = field(default_factory=list)


_current: Optional[Outputs] = None
PRECHECKS: dict[str, Callable[[dict], None]] = {}  # command -> its option checks that need no input


def precheck(command: str):
    """Register a command's checks of its own options, run on every link before the first link runs."""
    def register(check: Callable[[dict], None]) -> Callable[[dict], None]:
        PRECHECKS[command] = check
        return check

    return register


def current() -> Optional[Outputs]:
    """The chain being run, or None when a command runs alone."""
    return _current


def inputs(given, what: str, command: str, *made: str) -> list:
    """A command's inputs: the ones given on its command line, else the first non-empty of the chain's `made`
    fields (e.g. "comparisons", "run_dirs")."""
    if given:
        return list(given) if isinstance(given, (list, tuple)) else [given]
    available = next((getattr(_current, name) for name in made if getattr(_current, name)), None) \
        if _current is not None else None
    if available:
        return list(available)
    if _current is not None:
        raise UserError(f"`{command}` in a chain needs {what} from a link before it (e.g. train or compare "
                        f"first), or give it on its command line")
    raise UserError(f"`{command}` needs {what}; give it on the command line, or chain it after a command that "
                    f"makes it (e.g. ipasdctl train ... {command})")


def split(argv: list[str], commands: dict) -> list[list[str]]:
    """argv as links [[name, args...], ...]; one link when no command name follows the first command."""
    if not argv or argv[0] not in commands:
        return [argv]
    links = [[argv[0]]]
    params = _options(commands[argv[0]])
    takes_value = False
    for token in argv[1:]:
        if takes_value:
            takes_value = False
        elif token in commands:
            links.append([token])
            params = _options(commands[token])
            continue
        elif token.startswith("-") and "=" not in token:
            takes_value = params.get(token, False)
        links[-1].append(token)
    return links


def _options(command) -> dict[str, bool]:
    """Each option string of a click command -> whether it takes a value."""
    table = {}
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
        for opt in [*param.opts, *param.secondary_opts]:
            table[opt] = value and opt not in param.secondary_opts
    table["--help"] = False
    return table


def run(app, links: list[list[str]]) -> None:
    """Parse every link first (usage errors before anything runs), then run them in order."""
    global _current
    group = typer.main.get_command(app)
    with group.make_context("ipasdctl", [], resilient_parsing=True) as root:
        for name, *args in links:
            if "--help" in args:  # help of one link: show it and run nothing
                app(args=[name, *args], standalone_mode=False)
                return
            parsed = group.commands[name].make_context(name, list(args), parent=root)
            if name in PRECHECKS:
                PRECHECKS[name](parsed.params)
    chain = Outputs()
    _current = chain
    try:
        for name, *args in links:
            made = app(args=[name, *args], standalone_mode=False)
            record(chain, made)
    finally:
        _current = None


def record(chain: Outputs, made) -> None:
    """Add what one link made to what the chain has made (in order, each path once)."""
    if not isinstance(made, Outputs):
        return
    for name in ("run_dirs", "comparisons", "models", "latency_tables"):
        mine = getattr(chain, name)
        mine += [p for p in getattr(made, name) if p not in mine]
    chain.exports_dir = made.exports_dir or chain.exports_dir
