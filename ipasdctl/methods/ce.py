"""Cross-entropy: the reference every method is compared with.  L = CE(z, y)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import METHODS, Method


@METHODS.register
class CrossEntropy(Method):
    name = "ce"
    summary = "cross-entropy, the reference every method is compared with"

    def loss(self, net, batch) -> dict:
        logits = net(batch.images)["logits"].float()
        loss = F.cross_entropy(logits, batch.labels)
        return {"loss": loss, "logits": logits, "loss_ce": loss.detach()}
