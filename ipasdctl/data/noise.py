"""Noisy training labels, the standard robustness setting of the self-distillation literature.

Exactly round(rate * N) of the N training labels are flipped, chosen by a permutation seeded with
`data.label_noise.seed` (not the run's seed: every method and seed of a comparison trains on the same noisy
labels). Each chosen label always changes:
- `symmetric`: to one of the other K - 1 classes, uniformly at random. (Some papers draw from all K classes,
  so that only rate * (K - 1) / K of the labels actually change; here the stated rate is the applied rate.)
- `pairflip`: class c becomes class (c + 1) mod K (a structured confusion between neighbouring classes).
Only the training split is touched: the test set and the validation split (held out before the noise is
applied) keep their clean labels.
"""

from __future__ import annotations

import torch

from ..errors import UserError

NOISE_KINDS = ("symmetric", "pairflip")


def check_label_noise(rate: float, kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise UserError(f"data.label_noise.kind must be {' or '.join(NOISE_KINDS)}, got '{kind}'")
    if not 0.0 <= rate < 1.0:
        raise UserError(f"data.label_noise.rate must be at least 0 and below 1 (a fraction: 0.2 for 20 %), got {rate}")


def noisy_labels(labels: torch.Tensor, num_classes: int, rate: float, kind: str, seed: int) -> torch.Tensor:
    """A copy of `labels` with exactly round(rate * N) of them flipped to another class (see the module)."""
    check_label_noise(rate, kind)
    if num_classes < 2:
        raise UserError("label noise needs at least 2 classes")
    generator = torch.Generator().manual_seed(seed)
    count = int(round(rate * labels.numel()))
    chosen = torch.randperm(labels.numel(), generator=generator)[:count]
    if kind == "symmetric":
        offset = torch.randint(1, num_classes, (count,), generator=generator)
    else:
        offset = torch.ones(count, dtype=labels.dtype)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offset) % num_classes
    return noisy


def apply_label_noise(data, rate: float, kind: str, seed: int):
    """`data` with noisy training labels; `origin.label_noise` records the setting and the applied rate."""
    noisy = noisy_labels(data.train_labels, data.num_classes, rate, kind, seed)
    flipped = int((noisy != data.train_labels).sum())
    record = {"rate": rate, "kind": kind, "seed": seed, "flipped": flipped, "train_images": data.num_train,
              "applied_rate": flipped / max(data.num_train, 1)}
    return data.with_train_labels(noisy, record)
