"""run_dir/.lock: one process trains into a run folder (or runs a comparison in a comparison folder) at a time."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Optional

from ..errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: fall back to the owner's pid
    fcntl = None


class RunLock:
    """run_dir/.lock: held (flock) by the one process that trains into the folder; holds its pid and host.

    The kernel releases a flock when its process ends, however it ends, so the lock file of a crashed or
    SIGKILLed run is free at once and the next `--resume` takes it over; nothing is ever stale for good.
    """

    def __init__(self, run_dir: Path, name: str = ".lock"):
        self.path = Path(run_dir) / name
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"cannot lock run folder {self.path.parent}: {exc.strerror}; "
                                "make it writable or choose another folder") from None
            if not self._lock(fd):
                owner = _read_owner(fd)
                os.close(fd)
                raise UserError(f"run folder {self.path.parent} is in use by {owner}; wait for that run to "
                                "finish or stop it first (its lock goes away when it ends)")
            try:  # a releasing owner unlinks the file: make sure we locked the file that is at the path now
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            return

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                # no flock on this file system: fall through to the pid check
        pid = _owner_fields(fd)[0]
        return not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)))

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()  # while still locked, so a waiter that opened it retries (see acquire)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def _owner_fields(fd: int) -> list[str]:
    """[pid, host] as the lock's holder wrote them ('' where missing)."""
    try:
        fields = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        fields = []
    return (fields + ["", ""])[:2]


def _read_owner(fd: int) -> str:
    pid, host = _owner_fields(fd)
    return f"process {pid} on {host}" if pid and host else f"process {pid}" if pid else "another process"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
