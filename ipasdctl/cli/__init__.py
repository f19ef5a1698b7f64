"""The `ipasdctl` command line: thin Typer commands over library functions, one module per command family;
commands chain (`ipasdctl train ... export --onnx bench`, see chain.py).

Every user error is one line on stderr and exit code 2; IPASDCTL_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import sys
import traceback
from typing import Optional

import typer

from ..errors import Interrupted, UserError, debug_enabled
from . import chain
from . import train, listing, tune, compare, evaluate, report, calibrate, export, bench, predict, prune  # noqa: F401,I001  (each adds its command, in --help order)
from .app import app


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: the one error formatter (one line, exit 2; a traceback with IPASDCTL_DEBUG)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        links = chain.split(argv, typer.main.get_command(app).commands)
        if len(links) > 1:
            chain.run(app, links)
        else:
            app(args=argv, standalone_mode=False)
    except UserError as exc:
        if debug_enabled():
            raise
        if not hand_error_to_launcher(str(exc), exc.exit_code):  # under `train --nproc` the launcher prints it once
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        print(f"interrupted: checkpoint written; resume with: ipasdctl train --resume {exc.run_dir}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors from the click layer under Typer
        click_exc = _click_exceptions()
        if isinstance(exc, click_exc.ClickException):
            if debug_enabled():
                raise
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, typer.Abort):
            sys.exit(130)
        if not debug_enabled() and hand_error_to_launcher(str(exc), 1, traceback.format_exc()):  # train --nproc
            sys.exit(1)
        raise
    else:
        sys.exit(0)


def hand_error_to_launcher(message: str, exit_code: int, traceback_text: Optional[str] = None) -> bool:
    """training.launcher's, once a command has imported it (every `train --nproc` worker has): importing it
    here would import torch for every `--help` and every one-line error."""
    launcher = sys.modules.get("ipasdctl.training.launcher")
    return launcher is not None and launcher.hand_error_to_launcher(message, exit_code, traceback_text)


def _click_exceptions():
    """Typer >= 0.20 vendors click as typer._click; older releases use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older Typer
        from click import exceptions
    return exceptions


__all__ = ["app", "main"]
