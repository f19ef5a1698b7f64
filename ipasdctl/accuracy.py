"""Top-k accuracy, counted in one place for training, evaluation and the deployed (ONNX) models.

A sample counts as a top-k hit when its label is among the k largest logits, ties broken by class index
(the order of a stable descending sort): hit  <=>  #{c : z_c > z_y} + #{c < y : z_c = z_y} < k. Quantised
models give equal logits often, so the tie rule is stated rather than left to a sort's implementation.
"""

from __future__ import annotations

from typing import Sequence

import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """The number of top-k hits of the batch for each k in `ks` (a long tensor on the logits' device; no host
    read). A k of at least the number of classes counts every sample."""
    target = logits.gather(1, labels[:, None])
    classes = torch.arange(logits.shape[1], device=logits.device)
    rank = (logits > target).sum(1) + ((logits == target) & (classes[None, :] < labels[:, None])).sum(1)
    return torch.stack([(rank < k).sum() for k in ks])
