"""The learning-rate schedule: linear warm-up per step, then multi-step decay or cosine."""

from __future__ import annotations

import math

from ..config import Recipe


def lr_at(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Linear warm-up per step, then multi-step decay (milestones counted after warm-up) or cosine."""
    optim, epochs = recipe.optim, recipe.train.epochs
    warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return optim.lr * (step + 1) / warmup_steps
    after = (step - warmup_steps) / steps_per_epoch  # epochs since warm-up ended
    if optim.schedule == "multistep":
        return optim.lr * optim.gamma ** sum(after >= m for m in optim.milestones)
    if optim.schedule == "cosine":
        total = max(epochs - optim.warmup_epochs, 1e-9)
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(after / total, 1.0)))
    return optim.lr
