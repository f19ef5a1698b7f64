"""How the trainer reports: tqdm bars on a terminal (training steps, then the test pass); without a terminal a
line a few seconds into each epoch and then every minute; one line per epoch everywhere; a run's closing line
(progress off: nothing)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


def duration(seconds: float) -> str:
    """'41 s', '12 min 05 s', '3 h 20 min'."""
    seconds = max(0, round(seconds))
    if seconds < 100:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 100:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def run_line(summary, run_dir: Path) -> str:
    """The closing line of a run, from its summary.json (a runs.RunSummary): best and last top-1, the best epoch,
    the wall time."""
    def pct(value):
        return float("nan") if value is None else value
    return (f"finished in {duration(summary.wall_seconds or 0.0)}: best-epoch top-1 "
            f"{pct(summary.best_top1):.2f}% (epoch {summary.best_epoch} of {summary.epochs}, chosen on "
            f"{summary.best_chosen_on or 'test'}), last-epoch {pct(summary.last_top1):.2f}%; {run_dir}")


def stats_text(stats: dict) -> dict:
    """The running loss (loss=), its terms (ce=, kd=, ...) and accuracy of an epoch, formatted."""
    return {("loss" if k == "train_loss" else k.removeprefix("loss_")): f"{v:.3f}" for k, v in stats.items()
            if k.startswith("loss") or k == "train_loss"} | {"acc": f"{stats['train_top1']:.1f}"}


@dataclass
class StepLines:
    """Where a bar would be without a terminal (a log file, a job's output): `Progress.advance` prints a line
    `first_seconds` into the epoch, then every `every_seconds`, so a log shows that a slow epoch moves."""

    desc: str
    total: int
    next_at: float  # time.monotonic() of the next line
    every_seconds: float
    started: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        pass


@dataclass
class Progress:
    """How the trainer reports: tqdm bars on a terminal, lines elsewhere.

    The bar moves every step, counted on the host; its postfix (running loss terms and accuracy) reads the
    device every `refresh_steps` steps only, so the training step never waits for the device for a bar.
    Without a terminal the device is read only for the lines (`first_line_seconds` into an epoch, then every
    `line_seconds`)."""

    enabled: bool = True
    refresh_steps: int = 20
    stream: object = field(default_factory=lambda: sys.stderr)
    redraw_seconds: float = 0.5  # tqdm's mininterval: how often a bar is drawn at most
    first_line_seconds: float = 5.0
    line_seconds: float = 60.0

    def on_terminal(self) -> bool:
        return self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, file=self.stream, leave=False, desc=desc, dynamic_ncols=True,
                    mininterval=self.redraw_seconds, miniters=1)

    def bar(self, epoch: int, epochs: int, steps: int, done: int):
        """The epoch's bar on a terminal, its StepLines elsewhere, or None (progress off)."""
        desc = f"epoch {epoch + 1}/{epochs}"
        if self.on_terminal():
            return self._bar(steps, done, desc)
        if not self.enabled:
            return None
        return StepLines(desc, steps, time.monotonic() + self.first_line_seconds, self.line_seconds)

    def test_bar(self, batches: int):
        """The bar of the test pass after an epoch (`batches` of this process), or None."""
        return self._bar(batches, 0, "test") if self.on_terminal() else None

    def advance(self, bar, step: int, read_stats: Callable[[], dict]) -> None:
        """The bar at `step` of the epoch; every `refresh_steps` steps its postfix shows the epoch's running
        loss terms and accuracy (`read_stats` reads them from the device: the only host read). StepLines:
        a line when its time has come."""
        if bar is None:
            return
        if isinstance(bar, StepLines):
            now = time.monotonic()
            if now >= bar.next_at:
                bar.next_at = now + bar.every_seconds
                terms = " ".join(f"{k}={v}" for k, v in stats_text(read_stats()).items())
                self.note(f"{bar.desc}: step {step}/{bar.total} ({100 * step / max(bar.total, 1):.0f} %), "
                          f"{duration(now - bar.started)}  {terms}")
            return
        if step % self.refresh_steps == 0:
            bar.set_postfix(stats_text(read_stats()), refresh=False)
        bar.update(step - bar.n)  # tqdm redraws at most every mininterval seconds

    def note(self, text: str) -> None:
        """One line on the progress stream (nothing when progress is off)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def epoch_line(self, bar, row: dict, epochs: int) -> None:
        """Close the epoch's bar; print its one line (test and validation top-1 where the epoch was evaluated)."""
        if bar is not None:
            bar.close()
        terms = " ".join(f"{k.replace('loss_', '')}={row[k]:.3f}" for k in row if k.startswith("loss_"))
        held_out = "  ".join(f"{split}={row[f'{split}_top1']:.2f}%" for split in ("val", "test")
                             if row.get(f"{split}_top1") is not None)
        self.note(f"epoch {row['epoch']}/{epochs}  loss={row['train_loss']:.3f} {terms}  "
                  f"train={row['train_top1']:.1f}%  {held_out or 'not evaluated (train.eval_every)'}  "
                  f"{row['images_per_second']:.0f} img/s")

    def epoch_finished(self, row: dict) -> None:
        """Called once per epoch after its row is recorded and checkpointed (rank 0 only). Nothing here; a
        watcher of the run (tune's pruner, studies/tune.py) overrides it and may raise to stop the run, which
        then stays resumable from that epoch's checkpoint."""
