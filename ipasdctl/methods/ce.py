"""Cross-entropy: the reference every method is compared with.  L = CE(z, y)."""

from __future__ import annotations

import torch.nn.functional as F

from ..registry import METHODS
from .base import Method


@METHODS.register("ce")
class CrossEntropy(Method):
    name = "ce"

    def loss(self, net, batch) -> dict:
        logits = net(batch.images)["logits"].float()
        loss = F.cross_entropy(logits, batch.labels)
        return {"loss": loss, "logits": logits, "loss_ce": loss.detach()}
