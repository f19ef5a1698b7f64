"""CLI commands beyond train/list, one module each: `register(app)` adds the module's commands.

Modules here import only typer at import time (heavy imports inside the command functions), so
`ipasdctl --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all(app) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
