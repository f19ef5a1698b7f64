"""The exceptions the CLI formats: UserError, for everything a user can get wrong, and Interrupted.

The CLI turns a UserError into one line on stderr and exit code 2 (a traceback only with IPASDCTL_DEBUG=1).
Nothing here imports torch: the CLI's error formatter needs these before (or without) any command's library.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, on one line."""

    exit_code = 2


def one_line(exc: BaseException | str, limit: int | None = None, *, line: int | None = None,
             named: bool = False) -> str:
    """An exception's text on one line (every run of whitespace one space), cut at `limit` characters: the
    detail a UserError quotes from a library's multi-line message. `line`: only that line of the text (0, the
    first: an exporter's summary without its pages of notes; -1, the last: a worker's traceback ends with its
    error), blank lines not counted. `named`: after the exception's class name, "OSError: ...". A text with
    nothing in it gives the class name (an exception raised without a message still says what it was)."""
    text = str(exc).strip()
    if line is not None:
        lines = [item for item in text.splitlines() if item.strip()]
        text = lines[line] if lines else ""
    text = " ".join(text.split())[:limit]
    name = type(exc).__name__
    if named:
        return f"{name}: {text}" if text else name
    return text or name


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training; a checkpoint was written. `code` is the exit status (130 / 143)."""

    def __init__(self, code: int, run_dir: Path):
        super().__init__(code)
        self.code = code
        self.run_dir = run_dir


def debug_enabled() -> bool:
    """IPASDCTL_DEBUG set (and not 0): errors show their traceback instead of one line."""
    return os.environ.get("IPASDCTL_DEBUG", "") not in ("", "0")
