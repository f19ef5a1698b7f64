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
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from .errors import UserError, one_line

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

TMP_SUFFIX = ".tmp"
STAGING_GRACE_SECONDS = 10.0
FULL_DISK_BYTES = 1 << 20  # free space below which a failed write is put down to a full disk
_staging_locks: dict = {}  # staging folder -> the descriptor that holds its flock
_UMASK = os.umask(0)
os.umask(_UMASK)


# what a checkpoint's zip records may inflate to: torch.save stores them, so inflated ~= the file's size
MAX_INFLATION = 2
INFLATION_SLACK_BYTES = 1 << 20
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


def disk_full_error(folder: Path, exc: BaseException) -> Optional[UserError]:
    """The one line for a failure whose cause is a full disk, or None when it is not: an OSError ENOSPC (or
    EDQUOT) in the exception's chain, or under FULL_DISK_BYTES left where `folder` or the temporary folder
    lies. A library that lost the ENOSPC on the way reports what it found instead (onnx: "Wire format was
    corrupt", of the file it could not finish)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"cannot write into {folder}: {seen.strerror}; free disk space or choose another --out")
        seen = seen.__cause__ or seen.__context__
    for place in (Path(folder), Path(tempfile.gettempdir())):
        try:
            stats = os.statvfs(place)
        except (OSError, AttributeError):  # gone, or not POSIX
            continue
        free = stats.f_bavail * stats.f_frsize
        if free < FULL_DISK_BYTES:
            return UserError(f"cannot write into {place}: No space left on device ({free // 1024} kB free, "
                             f"which is what made it fail: {one_line(exc, 120)}); free disk "
                             "space or choose another --out")
    return None


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


def make_staging_folder(parent: Path, stem: str) -> Path:
    """A new hidden folder `.STEM.XXXXXXXX.tmp` in `parent`, locked (flock on the folder) by this process until
    remove_staging_folder. First the leftovers of killed runs with the same stem are removed: those no live
    process holds (the kernel drops a flock when its process dies, SIGKILL included)."""
    remove_stale_staging(parent, stem)
    path = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=TMP_SUFFIX, dir=parent))
    if fcntl is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: the folder is still removed when this process ends well
            pass
        _staging_locks[path] = fd
    return path


def remove_staging_folder(path: Path) -> None:
    """Remove a folder of make_staging_folder, then drop its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _staging_locks.pop(Path(path), None)
    if fd is not None:
        os.close(fd)


def remove_stale_staging(parent: Path, stem: str) -> None:
    """Remove the `.STEM.*.tmp` folders in `parent` that no live process locks, once older than
    STAGING_GRACE_SECONDS (a younger one may be between its creation and its lock)."""
    if fcntl is None:
        return  # no way to tell a live holder from a dead one: leave them
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(f".{stem}.") and e.name.endswith(TMP_SUFFIX)
                   and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < STAGING_GRACE_SECONDS:
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live export holds it
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet runs as a formula (OWASP's list)


def neutral_cell(value):
    """A text cell a spreadsheet would run as a formula (`=cmd|' /C calc'!A0`, `@SUM(1+1)`) with a ' in front,
    so it is shown as the text it is (OWASP's rule for CSV injection); numbers and other values as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def rows_csv_text(columns: list, rows: list, cell=neutral_cell) -> str:
    """Rows (dicts) as CSV text under a header of `columns`, the header through neutral_cell and every value
    through `cell` (neutral_cell, or a formatter that calls it): the rows-of-dicts twin of csv_text."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writerow({column: neutral_cell(column) for column in columns})
    for row in rows:
        writer.writerow({key: cell(value) for key, value in row.items()})
    return buffer.getvalue()


def csv_text(frame, float_format: str = "%.6g") -> str:
    """A DataFrame as CSV text without its index, the text cells and column names through neutral_cell:
    every CSV the suite writes goes through here (or neutral_cell), so none carries a formula."""
    import csv

    frame = frame.rename(columns=neutral_cell)
    carriage_return = False
    for position, dtype in enumerate(frame.dtypes):
        if dtype.kind == "O" or str(dtype) in ("string", "str"):
            column = frame.iloc[:, position].map(neutral_cell)
            frame.isetitem(position, column)
            carriage_return = carriage_return or column.map(lambda v: isinstance(v, str) and "\r" in v).any()
    # a CR inside a cell is left unquoted by the minimal quoting (the line ends in \n only), and would end the
    # row for a reader, the rest of the cell starting a row of its own: quote every text cell then
    quoting = csv.QUOTE_NONNUMERIC if carriage_return else csv.QUOTE_MINIMAL
    return frame.to_csv(index=False, float_format=float_format, quoting=quoting)


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
    check_inflated_size(path)
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


def check_inflated_size(path: Path) -> None:
    """A checkpoint's zip records may inflate to at most MAX_INFLATION x its file size (+ 1 MiB): torch.save
    stores them uncompressed, so a file whose directory promises more (a 4 MB file of deflated zeros that
    inflates to 3 GB) is no checkpoint of ours, and is refused from the sizes in its zip directory, unread."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy torch file, a torn one): torch.load says what it is
    size = path.stat().st_size
    bound = MAX_INFLATION * size + INFLATION_SLACK_BYTES
    if inflated > bound:
        raise UserError(f"{path} is not a checkpoint ipasdctl wrote: its zip records inflate to {_size(inflated)} "
                        f"from a {_size(size)} file, beyond the bound of {MAX_INFLATION} x the file size + 1 MiB "
                        f"({_size(bound)}; torch.save stores records uncompressed); it was refused unread: use "
                        "the run's other checkpoint (best.pt / last.pt) or train again")


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _refused_global(text: str) -> str:
    """The name torch's message gives for the refused global ('GLOBAL os.system', 'Unsupported global: ...')."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text) \
        or re.search(r"global ['`]?([\w.]+)", text)
    return f"'{match.group(1)}'" if match else "a Python object"
