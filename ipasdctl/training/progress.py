"""How the trainer reports: tqdm bars on a terminal (training steps, then the test pass), one line per epoch
everywhere (progress off: nothing)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Progress:
    """How the trainer reports: tqdm bars on a terminal, one line per epoch elsewhere.

    The bar moves every step, counted on the host; its postfix (running loss terms and accuracy) reads the
    device every `refresh_steps` steps only, so the training step never waits for the device for a bar."""

    enabled: bool = True
    refresh_steps: int = 20
    stream: object = field(default_factory=lambda: sys.stderr)
    redraw_seconds: float = 0.5  # tqdm's mininterval: how often a bar is drawn at most

    def on_terminal(self) -> bool:
        return self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, file=self.stream, leave=False, desc=desc, dynamic_ncols=True,
                    mininterval=self.redraw_seconds, miniters=1)

    def bar(self, epoch: int, epochs: int, steps: int, done: int):
        """The epoch's bar, or None (progress off, or not a terminal)."""
        return self._bar(steps, done, f"epoch {epoch + 1}/{epochs}") if self.on_terminal() else None

    def test_bar(self, batches: int):
        """The bar of the test pass after an epoch (`batches` of this process), or None."""
        return self._bar(batches, 0, "test") if self.on_terminal() else None

    def advance(self, bar, step: int, read_stats: Callable[[], dict]) -> None:
        """The bar at `step` of the epoch; every `refresh_steps` steps its postfix shows the epoch's running
        loss terms and accuracy (`read_stats` reads them from the device: the only host read)."""
        if bar is None:
            return
        if step % self.refresh_steps == 0:
            stats = read_stats()
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in stats.items()
                             if k.startswith("loss") or k == "train_loss"} | {"acc": f"{stats['train_top1']:.1f}"},
                            refresh=False)
        bar.update(step - bar.n)  # tqdm redraws at most every mininterval seconds

    def note(self, text: str) -> None:
        """One line on the progress stream (nothing when progress is off)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def epoch_line(self, bar, row: dict, epochs: int) -> None:
        """Close the epoch's bar; print its one line."""
        if bar is not None:
            bar.close()
        terms = " ".join(f"{k.replace('loss_', '')}={row[k]:.3f}" for k in row if k.startswith("loss_"))
        self.note(f"epoch {row['epoch']}/{epochs}  loss={row['train_loss']:.3f} {terms}  "
                  f"train={row['train_top1']:.1f}%  " + (f"val={row['val_top1']:.2f}%  " if "val_top1" in row else "")
                  + f"test={row['test_top1']:.2f}%  {row['images_per_second']:.0f} img/s")

    def epoch_finished(self, row: dict) -> None:
        """Called once per epoch after its row is recorded and checkpointed (rank 0 only). Nothing here; a
        watcher of the run (tune's pruner, studies/tune.py) overrides it and may raise to stop the run, which
        then stays resumable from that epoch's checkpoint."""
