"""Files that are never torn: write to a temporary file, flush, fsync, rename. Checkpoints load weights-only."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}; free disk space or choose another --out") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint that carries pickled code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (ipasdctl train) or name another run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (and others) for anything not weights-only
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "unpickl" in text.lower():
            raise UserError(
                f"{path} is not a weights-only checkpoint (it asks to run code on load); "
                "refusing to load it — use checkpoints written by ipasdctl"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}); it may be truncated") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not an ipasdctl checkpoint (no 'model' weights in it)")
    return state
