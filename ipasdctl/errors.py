"""One exception type for everything a user can get wrong.

The CLI turns a UserError into one line on stderr and exit code 2 (a traceback only with IPASDCTL_DEBUG=1).
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, on one line."""

    exit_code = 2


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
