"""How the trainer reports: a tqdm bar on a terminal, one line per epoch elsewhere."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class Progress:
    """How the trainer reports: a tqdm bar on a terminal, one line per epoch elsewhere."""

    enabled: bool = True
    refresh_steps: int = 20
    stream: object = field(default_factory=lambda: sys.stderr)

    def bar(self, epoch: int, epochs: int, steps: int, done: int):
        """The epoch's bar, or None (progress off, or not a terminal)."""
        if not self.enabled:
            return None
        if not (hasattr(self.stream, "isatty") and self.stream.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, initial=done, file=self.stream, leave=False, desc=f"epoch {epoch + 1}/{epochs}",
                    dynamic_ncols=True, mininterval=0.5)

    @staticmethod
    def refresh(bar, stats: dict, step: int) -> None:
        """The bar at `step`, with the epoch's running loss terms and accuracy (read from the device)."""
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in stats.items()
                         if k.startswith("loss") or k == "train_loss"} | {"acc": f"{stats['train_top1']:.1f}"},
                        refresh=False)
        bar.n = step
        bar.refresh()

    def note(self, message: str) -> None:
        """One line about the run (what its data is), before the epochs."""
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def epoch_line(self, bar, row: dict, epochs: int) -> None:
        """Close the epoch's bar; print its one line."""
        if bar is not None:
            bar.close()
        if not self.enabled:
            return
        terms = " ".join(f"{k.replace('loss_', '')}={row[k]:.3f}" for k in row if k.startswith("loss_"))
        print(f"epoch {row['epoch']}/{epochs}  loss={row['train_loss']:.3f} {terms}  "
              f"train={row['train_top1']:.1f}%  " + (f"val={row['val_top1']:.2f}%  " if "val_top1" in row else "")
              + f"test={row['test_top1']:.2f}%  "
              f"{row['images_per_second']:.0f} img/s", file=self.stream, flush=True)
