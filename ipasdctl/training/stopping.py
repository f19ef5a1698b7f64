"""When the loop stops early: SIGINT/SIGTERM (checkpoint, then stop), a non-finite loss (stop at the last good
checkpoint), and under several processes the agreement of every rank on the step where they stop.

SIGINT/SIGTERM finish the current step, write last.pt and raise Interrupted (the CLI prints how to resume and
exits 130/143); a second signal aborts at once (the last checkpoint stays).

Test hook (tests/training/test_resume.py): IPASDCTL_TEST_SIGNAL_AT_STEP="N[:KILL|TERM|INT][@RANK]" makes the process
(rank RANK only, if given) send itself that signal (default SIGKILL) right after global step N's update,
before that step's checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Optional

import torch

from ..errors import Interrupted, UserError  # noqa: F401  (Interrupted: raised here, re-exported)
from . import distributed
from .distributed import DistContext

TEST_SIGNAL_ENV = "IPASDCTL_TEST_SIGNAL_AT_STEP"
FINITE_CHECK_STEPS = 20  # how often (steps) the loop reads the device to stop early on a non-finite loss


@contextlib.contextmanager
def anomaly_detection(enabled: bool):
    """torch.autograd anomaly detection for the epoch (train.detect_anomaly), switched off however it ends."""
    if not enabled:
        yield
        return
    with torch.autograd.detect_anomaly(check_nan=True):
        yield


class StopControl:
    """The stop requests of one training session and the ranks' agreement on them."""

    def __init__(self, dist_ctx: DistContext, device: torch.device):
        self.dist = dist_ctx
        self.device = device
        self.signal: Optional[int] = None  # a SIGINT/SIGTERM this process received
        self.agreed_signal: Optional[int] = None  # the stop every rank agreed on (several processes)
        self.test_signal: Optional[tuple[int, int, Optional[int]]] = None

    @contextlib.contextmanager
    def handling_signals(self):
        """SIGINT/SIGTERM set the stop flag while the loop runs (the previous handlers come back after)."""
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        self.test_signal = _test_signal_at_step()
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, _frame) -> None:
        if self.signal is not None:  # a second signal: stop now (the last checkpoint stays as it is)
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def requested(self) -> Optional[int]:
        """The signal the loop acts on: this process's own, or under several processes the one all ranks
        agreed on at the last agreement point (so every rank checkpoints and stops at the same step)."""
        return self.agreed_signal if self.dist.enabled else self.signal

    def after_step(self, global_step: int) -> None:
        """The test hook: send the configured signal after this global step."""
        if self.test_signal is not None and global_step == self.test_signal[0] \
                and self.test_signal[2] in (None, self.dist.rank):
            os.kill(os.getpid(), self.test_signal[1])

    def agree(self, meter) -> bool:
        """Several processes: one all-reduce (max) of (signal received, non-finite loss seen) over ranks; sets
        the agreed stop signal and returns whether any rank saw a non-finite loss. Every rank calls it at the
        same steps (the loop's agreement points are functions of the global step and of earlier agreements)."""
        flags = torch.stack([torch.tensor(self.signal or 0, device=self.device),
                             (meter.first_nonfinite_step >= 0).long()])
        signal_code, nonfinite = distributed.all_reduce_max(flags).tolist()
        if signal_code and self.agreed_signal is None:
            self.agreed_signal = int(signal_code)
        return bool(nonfinite)

    def check_finite(self, meter, epoch: int, last_checkpoint: Optional[Path]) -> None:
        """A UserError naming the first non-finite step and its loss terms, if there was one."""
        if self.dist.enabled:
            if not self.agree(meter):
                return
            # the first bad step over ranks (another collective, only on the way out)
            local = meter.first_nonfinite_step
            first = torch.where(local >= 0, local, torch.full_like(local, 2**62))
            distributed.all_reduce_max(first.neg_())
            bad_step = int(-first.item())
            report = meter.nonfinite_report() if meter.nonfinite_step() == bad_step else "on another process"
        else:
            bad_step = meter.nonfinite_step()
            if bad_step < 0:
                return
            report = meter.nonfinite_report()
        raise UserError(f"non-finite loss at epoch {epoch + 1}, step {bad_step + 1} ({report}); "
                        f"{_kept(last_checkpoint)}; lower the lr, or set train.detect_anomaly=true to find the operation")

    def check_weights(self, net: torch.nn.Module, where: str, last_checkpoint: Optional[Path]) -> None:
        """A UserError when a weight or a buffer (BatchNorm running statistics) is no longer finite: a loss
        can stay finite for a step while the statistics its forward pass updated have overflowed. One host
        read per checkpoint; under several processes the ranks agree (rank 0 writes what they all hold)."""
        tensors = {name: t for name, t in net.state_dict().items() if t.is_floating_point() and t.numel()}
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
        bad = (~finite).any().long()
        if self.dist.enabled:
            bad = distributed.all_reduce_max(bad)
        if not bad.item():
            return
        names = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else \
            "on another process"
        raise UserError(f"non-finite weights or BatchNorm statistics {where} ({shown}); "
                        f"{_kept(last_checkpoint)}; lower the lr")

    def stop(self, bar, run_dir: Path) -> None:
        """Raise Interrupted for the requested signal, once every rank is here (rank 0 has checkpointed)."""
        if bar is not None:
            bar.close()
        distributed.barrier(self.dist)  # no rank ends before rank 0 has written the checkpoint
        code = 130 if self.requested == signal.SIGINT else 143
        raise Interrupted(code, run_dir)


def _kept(last_checkpoint: Optional[Path]) -> str:
    return (f"the last good checkpoint is kept in {last_checkpoint}"
            if last_checkpoint is not None and last_checkpoint.is_file() else "no checkpoint had been written yet")


def _test_signal_at_step() -> Optional[tuple[int, int, Optional[int]]]:
    """(global step, signal, rank or None for every rank) from IPASDCTL_TEST_SIGNAL_AT_STEP=
    'N[:KILL|TERM|INT][@RANK]'; tests only."""
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None
    value, _, rank = value.partition("@")
    step, _, name = value.partition(":")
    return (int(step), int(getattr(signal, "SIG" + (name or "KILL").upper().removeprefix("SIG"))),
            int(rank) if rank else None)
