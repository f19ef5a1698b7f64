"""MaxSup: maximum suppression, label smoothing's penalty moved from the target logit to the largest one.

Zhou et al., "Maximum Suppression Regularization" (MaxSup), NeurIPS 2025 (arXiv 2502.15798; release:
ZhouYuxuanYX/Maximum-Suppression-Regularization, Conv/common_resnet/train.py, LT/loss/MAXsupLoss.py).
With z the logits of the plain batch and K classes:
    loss = CE(z, y) + lam_e mean_i (max_k z_ik - mean_k z_ik),   lam_e = begin + (end - begin) e / max(E - 1, 1)
nothing detached: the penalty's gradient is lam_e / B (onehot(argmax z_i) - 1/K). Label smoothing with eps on
every class (torch's label_smoothing=eps) is exactly CE + eps mean_i (z_iy - mean_k z_ik): MaxSup puts the
largest logit where label smoothing has the target's, so the two agree on correctly classified samples and
differ only on errors. (ipasdctl's `ls` spreads eps over the wrong classes only: a different loss again.)
Defaults begin 0.1, end 0.2: the ramp of common_resnet/train.py, LT and OOD (epoch e counted from 0, 0.1 in
the first epoch, 0.2 in the last), guarded for E = 1 as LT and OOD are (common_resnet divides by zero).
The release's ffcv variant ramps over E instead (ending short of 0.2) and DeiT's over 299 epochs hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import param
from .base import METHODS, Method, StepResult


@dataclass
class MaxSupParams:
    begin: float = param(0.1, ge=0)  # lam_e in the first epoch
    end: float = param(0.2, ge=0)  # lam_e in the last epoch


def maxsup_lambda(epoch: int, epochs: int, begin: float, end: float) -> float:
    """lam_e = begin + (end - begin) e / max(E - 1, 1), e counted from 0."""
    return begin + (end - begin) * epoch / max(epochs - 1, 1)


def maxsup_loss(logits: torch.Tensor, labels: torch.Tensor, lam: float) -> dict:
    logits = logits.float()
    loss_ce = F.cross_entropy(logits, labels)
    loss_maxsup = (logits.max(1).values - logits.mean(1)).mean()
    return {"loss": loss_ce + lam * loss_maxsup, "loss_ce": loss_ce, "loss_maxsup": loss_maxsup,
            "lam": loss_ce.new_full((), lam)}


@METHODS.register
class MaxSup(Method):
    name = "maxsup"
    summary = "maximum suppression: penalises the largest logit, not the target one (Zhou et al. 2025)"
    Params = MaxSupParams

    def loss(self, net, batch) -> StepResult:
        logits = net(batch.images)["logits"]
        lam = maxsup_lambda(batch.epoch, self.ctx.epochs, self.params.begin, self.params.end)
        return StepResult.of(maxsup_loss(logits, batch.labels, lam), logits, batch.labels)
