"""Label smoothing (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016).

    q_c = 1 - eps if c = y, eps / (K - 1) otherwise;   loss = -mean_i sum_c q_ic log softmax(z_i)_c
The smoothing mass goes to the K - 1 wrong classes only (as Self-KD-Lib and the Tf-KD release compute it),
not eps / K to every class as torch's `label_smoothing=` does. Default eps = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..params import param
from .base import METHODS, Method, MethodContext, StepResult
from .losses import soft_cross_entropy


@dataclass
class LabelSmoothingParams:
    eps: float = param(0.1, ge=0, lt=1, tune=(0.0, 0.3))


def smoothed_targets(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """(1 - eps) on the label, eps / (K - 1) on every other class."""
    off = eps / (num_classes - 1)
    onehot = F.one_hot(labels, num_classes).float()
    return onehot * (1.0 - eps) + (1.0 - onehot) * off


def label_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    logits = logits.float()
    target = smoothed_targets(labels, logits.shape[1], eps)
    return soft_cross_entropy(logits, target)


@METHODS.register
class LabelSmoothing(Method):
    name = "ls"
    summary = "label smoothing: eps of the target spread over the wrong classes (Szegedy et al. 2016)"
    Params = LabelSmoothingParams

    def __init__(self, params: LabelSmoothingParams, ctx: MethodContext):
        super().__init__(params, ctx)
        if ctx.num_classes < 2:
            raise UserError("label smoothing needs at least 2 classes")

    def loss(self, net, batch) -> StepResult:
        logits = net(batch.images)["logits"]
        loss = label_smoothing_loss(logits, batch.labels, self.params.eps)
        return StepResult(loss, logits, batch.labels, {"loss_ls": loss})
