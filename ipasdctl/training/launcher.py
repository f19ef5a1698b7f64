"""`ipasdctl train --nproc N`: the launch of N training processes through torchrun, and the one-line report
of the first failure (see distributed.py for how the processes train together)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .. import runtime
from ..errors import UserError
from .distributed import SYNC_BN_NEEDS_CUDA, context_from_env

ERROR_DIR_ENV = "IPASDCTL_ERROR_DIR"  # set by `train --nproc`: where each worker leaves its one-line error
SHUTDOWN_SECONDS = "300"  # torchrun's wait for the workers' last checkpoint after a signal, before SIGKILL


def hand_error_to_launcher(message: str, exit_code: int, traceback_text: Optional[str] = None) -> bool:
    """A worker of `train --nproc` leaves its error for the launch instead of printing it: a one-line user
    error (message, exit status), or the traceback of an unexpected exception. After the launch, the rank that
    failed first is reported, once (`report_failure`): a peer's failure makes the others fail too, and their
    errors would only bury it. False outside such a launch (the caller prints it itself)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    ctx = context_from_env()
    if not folder or not ctx.enabled:
        return False
    name, text = (f"rank{ctx.rank:06d}.traceback", traceback_text) if traceback_text is not None else \
        (f"rank{ctx.rank:06d}.error", f"{exit_code}\n{message}")
    try:
        Path(folder, name).write_text(text)
    except OSError:
        return False
    return True


def report_failure(folder: str, rank: Optional[int], exit_code: int) -> int:
    """Print what the rank that failed first left (its one-line error, else its traceback; a rank killed by a
    signal left nothing, so one line says so) and return the launch's exit status. rank None: no rank failed
    on its own (a stop by signal): print the lowest rank's one-line error, if one met any."""
    if rank is None:
        errors = sorted(Path(folder).glob("rank*.error"))
        error = errors[0] if errors else None
    else:
        error = Path(folder, f"rank{rank:06d}.error")
    if error is not None and error.exists():
        code, _, message = error.read_text().partition("\n")
        print(f"error: {message}", file=sys.stderr)
        return int(code) if code.strip().isdigit() and exit_code > 0 else _status(exit_code)  # its own status
    if rank is None:
        return _status(exit_code)
    traceback_file = Path(folder, f"rank{rank:06d}.traceback")
    if traceback_file.exists():
        print(traceback_file.read_text(), end="", file=sys.stderr)
    elif exit_code < 0:
        print(f"error: {_killed_line(rank, -exit_code)}", file=sys.stderr)
    return _status(exit_code)


def _status(code: int) -> int:
    """A process's exit status as a shell reports it: killed by signal N is 128 + N."""
    return 128 - code if code < 0 else code


def _killed_line(rank: int, signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = " (out of memory? lower --batch-size or --nproc)" if signum == signal.SIGKILL else ""
    return (f"the training process of rank {rank} was killed by {name}{hint}; a run resumes from its last "
            "checkpoint with: ipasdctl train --resume RUN")


def launch(nproc: int, args: list[str], recipe=None) -> int:
    """`ipasdctl train --nproc N`: run `python -m ipasdctl <args>` as N processes on this machine through
    torchrun (`python -m ipasdctl.training.torchrun --standalone --nproc_per_node N`: torch.distributed.run without its
    traceback), wait, and return its exit status. A new run's recipe (resolved by the command, so its values are
    checked) is checked against N first, so a bad option is one line, not N tracebacks; an error the workers meet later is printed once, the first failing rank's, with
    its status (`report_failure`).

    Signals: torchrun is started in a session of its own and SIGINT/SIGTERM are forwarded to it once, so a
    Ctrl-C reaches each worker exactly once (through torchrun): they agree on a step, checkpoint and stop;
    the status is then 130/143, as a single process. Unless set, OMP_NUM_THREADS is the CPU count / N (torchrun
    would set 1) and torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 s for that last checkpoint."""
    if nproc < 1:
        raise UserError(f"--nproc must be 1 or more, got {nproc}")
    if context_from_env().enabled:
        raise UserError("--nproc starts the processes itself; under torchrun leave it out")
    if recipe is not None:
        _check_launch(nproc, recipe)
    with tempfile.TemporaryDirectory(prefix="ipasdctl-errors-") as errors:
        code, received = _run_torchrun(nproc, args, errors)  # ipasdctl.torchrun reports a failure
    if received:  # stopped by the user: the status says so, as for one process
        return 128 + received[0]
    return _status(code)


def _run_torchrun(nproc: int, args: list[str], errors: str) -> tuple[int, list[int]]:
    command = [sys.executable, "-m", "ipasdctl.training.torchrun", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ipasdctl", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_SECONDS)
    env[ERROR_DIR_ENV] = errors
    process = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, received


def _check_launch(nproc: int, recipe) -> None:
    t = recipe.train  # resolved (checked) by the command line
    if t.batch_size < nproc:
        raise UserError(f"batch size {t.batch_size} is smaller than --nproc {nproc}: it is the global batch, "
                        f"shared out among the processes; use --batch-size {nproc} or more")
    device = runtime.resolve_device(t.device)
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"--device {t.device}: with --nproc each process uses its own GPU; use --device cuda")
        if nproc > torch.cuda.device_count():
            raise UserError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}; "
                            "use fewer processes (or --device cpu)")
    elif t.sync_bn:
        raise UserError(SYNC_BN_NEEDS_CUDA)
