"""DKS: deeply-supervised knowledge synergy, every classifier learns from every other one.

Sun, Yao, Zhou, Zhang, "Deeply-supervised Knowledge Synergy", CVPR 2019 (as Self-KD-Lib's methods/dks.py
computes it). Classifiers h = 0..H (0 the main one, 1..H auxiliary heads after intermediate stages):
    loss = ce_weight sum_h CE(z_h, y) + kd_weight sum_{h != g} T^2 KL( p_T(z_g) || p_T(z_h) ),   T 4
the sum over every ordered pair (h student, g teacher, teacher side detached), H (H + 1) terms.
Readings chosen:
- The heads are the bottleneck branches of aux_heads.py (shared with BYOT), on the same default stages;
  Self-KD-Lib's DKS heads are copies of the backbone's remaining residual stages (deeper than its BYOT
  ones), and the paper's own branches differ again per architecture.
- Sums, not means, over heads and pairs, as Self-KD-Lib.
- The logits returned are the main classifier's; the heads exist only in training (`extra_module`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..params import param
from .base import METHODS, StepResult
from .aux_heads import AuxiliaryHeadMethod
from .losses import distill_kl


@dataclass
class DKSParams:
    T: float = param(4.0, gt=0, tune=(1.0, 8.0))
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    aux_stages: Optional[list[int]] = None  # 0-based stages with a head; None: the last two intermediate ones


def dks_loss(all_logits: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float,
             ce_weight: float, kd_weight: float) -> dict:
    """all_logits: the main classifier's first, then the auxiliary heads'."""
    all_logits = [logits.float() for logits in all_logits]
    loss_ce = sum(F.cross_entropy(logits, labels) for logits in all_logits)
    loss_kd = torch.zeros((), device=labels.device)
    for student_index, student in enumerate(all_logits):
        for teacher_index, teacher in enumerate(all_logits):
            if teacher_index != student_index:
                loss_kd = loss_kd + distill_kl(student, teacher, temperature)
    loss = ce_weight * loss_ce + kd_weight * loss_kd
    return {"loss": loss, "loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}


@METHODS.register
class KnowledgeSynergy(AuxiliaryHeadMethod):
    name = "dks"
    summary = "deeply-supervised knowledge synergy: every head learns from every other (Sun et al. 2019)"
    Params = DKSParams

    def loss(self, net, batch) -> StepResult:
        out = net(batch.images)
        result = dks_loss([out["logits"], *out["aux_logits"]], batch.labels, self.params.T,
                          self.params.ce_weight, self.params.kd_weight)
        return StepResult.of(result, out["logits"], batch.labels)
