"""Cross-entropy: the reference every method is compared with.  L = CE(z, y)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import METHODS, Method, StepResult


@METHODS.register
class CrossEntropy(Method):
    name = "ce"
    summary = "cross-entropy, the reference every method is compared with"

    def loss(self, net, batch) -> StepResult:
        logits = net(batch.images)["logits"].float()
        loss = F.cross_entropy(logits, batch.labels)
        return StepResult(loss, logits, batch.labels, {"loss_ce": loss})
