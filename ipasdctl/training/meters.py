"""What the loop measures: the epoch's running sums (EpochMeter) and the test pass after each epoch."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import runtime
from ..accuracy import topk_hits
from ..methods import StepResult
from . import distributed
from .distributed import DistContext
from .progress import Progress


@torch.no_grad()
def test_metrics(model: nn.Module, data, device, dtype, batch_size: int, channels_last: bool = False,
                 dist_ctx: Optional[DistContext] = None, stop: Optional[Callable[[], bool]] = None,
                 progress: Optional[Progress] = None, split: str = "test") -> Optional[dict]:
    """Loss, top-1 and top-5 (%) of the plain model on the test (or the validation, `split="val"`) split, as
    `<split>_loss`, `<split>_top1`, `<split>_top5`; sums stay on the device until the end. None when `stop()`
    turns true between two batches (a signal: the loop checkpoints and stops within a batch).

    With `dist_ctx` of several processes (every rank holding the same model), rank r evaluates the
    batches i with i mod W = r and the sums are added over ranks: every rank returns the same figures.
    `progress`: a bar of this process's batches on a terminal (counted on the host)."""
    model.eval()
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None and dist_ctx.enabled else (0, 1)
    bar = progress.test_bar(len(range(rank, math.ceil(data.held_out_size(split) / batch_size), world))) if progress else None
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5
    for i, (x, y) in enumerate(data.held_out_batches(split, batch_size, device, channels_last)):
        if stop is not None and stop():
            if bar is not None:
                bar.close()
            model.train()
            return None
        if i % world != rank:
            continue
        with runtime.autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        hits += topk_hits(logits, y, (1, 5))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if world > 1:
        sums = torch.cat([loss_sum[None], hits.to(loss_sum.dtype)])
        distributed.all_reduce_sum(sums)
        loss_sum, hits = sums[0], sums[1:]
    top1, topk = hits.unbind()
    n = data.held_out_size(split)
    model.train()
    return {f"{split}_loss": (loss_sum / n).item(), f"{split}_top1": (100.0 * top1 / n).item(),
            f"{split}_top5": (100.0 * topk / n).item()}


class EpochMeter:
    """Running sums of the epoch's loss terms and accuracy, kept on the device (read at refresh and epoch end).

    The first step whose loss is not finite, and its loss terms, are recorded on the device too, so the loop
    can stop with a precise message without reading the device every step. Under several processes each rank
    sums its own steps; `read(over_ranks=True)` and the checkpoint (`state_dict`) add the ranks' sums up, and a
    rank restoring them keeps them only if it is rank 0, so the next sum over ranks counts them once.
    """

    def __init__(self, device, dist_ctx: Optional[DistContext] = None):
        self.device = device
        self.dist = dist_ctx or DistContext()
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=device)
        self.nonfinite_terms: dict[str, torch.Tensor] = {}  # the terms of that step

    def update(self, result: StepResult, step: int) -> None:
        """Add one step: its loss and terms weighted by its number of samples, and its correct predictions."""
        labels = result.labels
        n = labels.numel()
        first_bad = ~torch.isfinite(result.loss.detach()) & (self.first_nonfinite_step < 0)
        for key, value in {"loss": result.loss, **result.terms}.items():
            value = value.detach().float()
            if key not in self.sums:
                self.sums[key] = torch.zeros((), device=self.device)
                self.nonfinite_terms[key] = torch.zeros((), device=self.device)
            self.sums[key] += value * n
            self.nonfinite_terms[key] = torch.where(first_bad, value, self.nonfinite_terms[key])
        logits = result.logits.detach()
        self.correct += (logits.argmax(1) == labels).sum()
        self.count += n
        self.first_nonfinite_step = torch.where(first_bad, torch.full_like(self.first_nonfinite_step, step),
                                                self.first_nonfinite_step)

    def totals(self) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(sums, correct, count) over every rank: copies, one collective (this rank's own stay as they are).
        Every rank runs the same method, so every rank has the same terms in the same order."""
        if not self.dist.enabled:
            return self.sums, self.correct, self.count
        keys = list(self.sums)
        packed = torch.stack([self.sums[k] for k in keys] + [self.correct.float(), self.count.float()])
        distributed.all_reduce_sum(packed)
        return dict(zip(keys, packed[:-2].unbind())), packed[-2], packed[-1]

    def read(self, over_ranks: bool = False) -> dict:
        sums, correct, count = self.totals() if over_ranks else (self.sums, self.correct, self.count)
        count = max(count.item(), 1.0)
        values = {("train_loss" if k == "loss" else k): (v / count).item() for k, v in sums.items()}
        values["train_top1"] = 100.0 * correct.item() / count
        return values

    def nonfinite_step(self) -> int:
        return int(self.first_nonfinite_step.item())

    def nonfinite_report(self) -> str:
        """'loss=nan, loss_ce=2.3, ...': the loss terms of the first non-finite step."""
        return ", ".join(f"{k}={v.item():.4g}" for k, v in self.nonfinite_terms.items())

    def state_dict(self) -> dict:
        sums, correct, count = self.totals()
        return {"sums": dict(sums), "correct": correct, "count": count}

    def load_state_dict(self, state: dict) -> None:
        def restored(value: torch.Tensor) -> torch.Tensor:
            value = value.to(self.device)
            return value if self.dist.is_main else torch.zeros_like(value)

        self.sums = {k: restored(v) for k, v in state["sums"].items()}
        self.nonfinite_terms = {k: torch.zeros((), device=self.device) for k in self.sums}
        self.correct = restored(state["correct"])
        self.count = restored(state["count"])
