"""Chained subcommands: `ipasdctl train ... export --onnx --int8 bench report` runs each command in order, each
taking the previous ones' output when its own input is left out.

The command line is split where a command's name stands in place of an option or argument of the command
before it (a value of an option never starts a link: `--name bench` is a name). Every link is parsed by its own
command before the first one runs, so a mistake in any of them is one line and exit 2 before anything trains.
Each command then runs as it does alone, given a `Link` (the click context's `obj`): what the links before it
made (the `Outputs` they returned, which the next links read) and the parameters a chain sets:

    tune             ->  study folders                          (compare --tuned reads them)
    train / compare  ->  run folders (and the comparison folder)
    export           ->  exported models (and their folder)      (default input: every run folder so far)
    bench            ->  latency tables                          (default input: every exported model)
    report / eval                                                (default input: the comparison, or the runs)

A chain is resumable: rerunning it skips finished runs (`reuse`: train reuses a finished run of the same name
and recipe; compare skips as always), exports whose source checkpoint is unchanged (`skip_unchanged`), and
latencies already measured on this CPU with the same settings (`skip_measured`). A command run alone gets
`ALONE`: nothing made before, none of these set. No module-level state: the link is the command's argument.
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
    studies: list[Path] = field(default_factory=list)  # tune's study folders (compare --tuned's default)
    models: list[Path] = field(default_factory=list)
    exports_dir: Optional[Path] = None
    latency_tables: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Link:
    """What the chain gives the command it runs: what the links before made, and how a rerun behaves. Each
    command passes these on to the library as plain parameters."""

    made: Optional[Outputs] = None  # None: the command runs alone
    reuse: bool = False  # train: a finished run of the same name and recipe is returned, an interrupted one resumed
    skip_unchanged: bool = False  # export: an export whose checkpoint (and settings) are unchanged is kept
    skip_measured: bool = False  # bench: latencies measured on this CPU with the same settings are kept

    @property
    def exports_dir(self) -> Optional[Path]:
        """The folder the links before exported into (report's default --exports)."""
        return self.made.exports_dir if self.made is not None else None

    def inputs(self, given, what: str, command: str, *made: str) -> list:
        """A command's inputs: the ones given on its command line, else the first non-empty of the chain's
        `made` fields (e.g. "comparisons", "run_dirs")."""
        if given:
            return list(given) if isinstance(given, (list, tuple)) else [given]
        if self.made is None:
            raise UserError(f"`{command}` needs {what}; give it on the command line, or chain it after a command "
                            f"that makes it (e.g. ipasdctl train ... {command})")
        available = next((getattr(self.made, name) for name in made if getattr(self.made, name)), None)
        if available:
            return list(available)
        raise UserError(f"`{command}` in a chain needs {what} from a link before it (e.g. train or compare "
                        f"first), or give it on its command line")


ALONE = Link()
PRECHECKS: dict[str, Callable[[dict], None]] = {}  # command -> its option checks that need no input


def precheck(command: str):
    """Register a command's checks of its own options, run on every link before the first link runs."""
    def register(check: Callable[[dict], None]) -> Callable[[dict], None]:
        PRECHECKS[command] = check
        return check

    return register


def link(ctx: typer.Context) -> Link:
    """The link a command was given by the chain running it; ALONE when it runs by itself."""
    return ctx.obj if isinstance(ctx.obj, Link) else ALONE


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
    """Parse every link first (usage errors before anything runs), then run them in order, each given what the
    links before it made and the rerun parameters."""
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
    for name, *args in links:
        given = Link(made=chain, reuse=True, skip_unchanged=True, skip_measured=True)
        record(chain, app(args=[name, *args], standalone_mode=False, obj=given))


def record(chain: Outputs, made) -> None:
    """Add what one link made to what the chain has made (in order, each path once)."""
    if not isinstance(made, Outputs):
        return
    for name in ("run_dirs", "comparisons", "studies", "models", "latency_tables"):
        mine = getattr(chain, name)
        mine += [p for p in getattr(made, name) if p not in mine]
    chain.exports_dir = made.exports_dir or chain.exports_dir
