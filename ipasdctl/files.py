"""Files that are never torn, and checkpoints that never run code.

Every file a run writes (checkpoints, CSVs, JSON, YAML) goes to a temporary file in the same folder, is
flushed and fsynced, then renamed over the old one (and the folder is fsynced so the rename lasts): a kill
at any instant leaves either the previous good file or the new one. A failed write (disk full, permission)
removes its temporary file, leaves the previous file as it was, and is one UserError line.

Checkpoints load with torch.load(weights_only=True): tensors, numbers, strings and containers only. A file
that asks to import anything else (pickled code) is refused before any of it runs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import UserError, one_line

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


CHECKPOINTS = ("best", "last")  # the checkpoints a run folder keeps (checkpoints/best.pt, checkpoints/last.pt)


def check_checkpoint(which: str) -> str:
    """`which`, when it names one of CHECKPOINTS; a UserError otherwise (torch-free: the CLI's pre-checks use it)."""
    if which not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be {' or '.join(CHECKPOINTS)}, got '{which}'")
    return which


def _write_error(path: Path, exc: OSError) -> UserError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or choose another --out"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another --out"
    else:
        fix = "check the folder or choose another --out"
    kept = " (the previous file is kept)" if path.exists() else ""
    return UserError(f"cannot write {path}: {reason}{kept}; {fix}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(handle) on a temporary file beside `path`, fsync it, and rename it onto `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:  # also on KeyboardInterrupt: never leave the temporary file behind
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_temporaries(folder: Path) -> None:
    """Remove the temporary files (.NAME.XXXX.tmp) a process killed while writing left in `folder`. Only for
    a folder no one is writing to (a run folder whose lock the caller holds)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    import torch  # here, not at the top: the CLI writes its cache (atomic_write_json) without importing torch

    # serialise in memory first: torch's zip writer turns an OSError of the file into a RuntimeError
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint that carries pickled code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (ipasdctl train) or name another run folder")
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler refuses every global it does not know (os.system, a class, ...) here
        text = one_line(exc)
        if re.search(r"GLOBAL|allowlist|reduce", text):  # it names a callable or class: pickled code
            culprit = _refused_global(text)
            raise UserError(
                f"{path} is not a weights-only checkpoint; it asks to load {culprit}, which could run code, "
                "so it was refused unread; use checkpoints written by ipasdctl (or re-save the weights alone)"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint (bad pickle data); it may be truncated or corrupt: "
                        "use the run's other checkpoint (best.pt / last.pt) or train again") from None
    except Exception as exc:  # zip reader errors, EOF, wrong magic number: a torn or foreign file
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}); it may be truncated or "
                        "corrupt: use the run's other checkpoint (best.pt / last.pt) or train again") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not an ipasdctl checkpoint (no 'model' weights in it)")
    return state


def _refused_global(text: str) -> str:
    """The name torch's message gives for the refused global ('GLOBAL os.system', 'Unsupported global: ...')."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text) \
        or re.search(r"global ['`]?([\w.]+)", text)
    return f"'{match.group(1)}'" if match else "a Python object"
