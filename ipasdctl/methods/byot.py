"""BYOT: be your own teacher, the deepest classifier teaches auxiliary classifiers on shallower stages.

Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of Convolutional Neural
Networks via Self Distillation", ICCV 2019. Heads h = 1..H after intermediate stages (aux_heads.py), main
logits z_0 and last feature map F_0, head logits z_h and feature maps F_h:
    loss = ce_weight sum_{h=0..H} CE(z_h, y) + kd_weight sum_{h>=1} T^2 KL(p_T(z_0) || p_T(z_h))
         + feat_weight sum_{h>=1} D(F_h, F_0)                    (z_0, F_0 detached in the KL and D terms)
Defaults are Self-KD-Lib's (methods/byot.py): weights 1, 1, 0.05, T 4, D = mean squared difference of the
feature maps (its 0.5 * 0.1 * mean). The BYOT original (luanyunteng/pytorch-be-your-own-teacher) is
    ce_weight=0.9 kd_weight=0.1 T=3 feat_weight=1e-6 feat_loss=pooled_masked_sum aux_stages=[0,1,2]
(its (1 - a) sum CE + a sum KD + b sum feat with a 0.1, b 1e-6, a head after every stage of a 4-stage net),
with D = sum over the batch and channels of the masked squared difference of the *pooled* features,
mask (F_h > 0 or F_0 > 0). Readings chosen:
- The original's KD is cross-entropy against the soft teacher; KL differs from it by the teacher's entropy,
  a constant of the student: same gradient, a different reported value.
- The heads are bottleneck branches built from the stage widths (see aux_heads.py), not Self-KD-Lib's copies
  of the backbone's remaining residual stages.
- The logits returned (train accuracy, evaluation, export) are the main classifier's; the heads exist
  only in training (`extra_module`).
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

FEATURE_LOSSES = ("map_mse", "pooled_masked_sum")


@dataclass
class BYOTParams:
    T: float = param(4.0, gt=0, tune=(1.0, 8.0))
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    feat_weight: float = 0.05
    feat_loss: str = param("map_mse", choices=FEATURE_LOSSES)  # map_mse (Self-KD-Lib) | pooled_masked_sum (the original)
    aux_stages: Optional[list[int]] = None  # 0-based stages with a head; None: the last two intermediate ones


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """D(F_h, F_0) with F_0 detached: the mean squared difference, or the original's masked sum."""
    student, teacher = student.float(), teacher.detach().float()
    if kind == "map_mse":
        return (student - teacher).pow(2).mean()
    mask = ((student > 0) | (teacher > 0)).float()
    return ((student - teacher).pow(2) * mask).sum()


def byot_loss(main_logits: torch.Tensor, aux_logits: Sequence[torch.Tensor], main_feature: torch.Tensor,
              aux_features: Sequence[torch.Tensor], labels: torch.Tensor, params: BYOTParams) -> dict:
    """main_feature / aux_features: the last feature maps (map_mse) or the pooled vectors (pooled_masked_sum)."""
    main_logits = main_logits.float()
    loss_ce = F.cross_entropy(main_logits, labels)
    loss_kd = torch.zeros((), device=main_logits.device)
    loss_feat = torch.zeros((), device=main_logits.device)
    for head_logits, head_feature in zip(aux_logits, aux_features):
        loss_ce = loss_ce + F.cross_entropy(head_logits.float(), labels)
        loss_kd = loss_kd + distill_kl(head_logits, main_logits, params.T)
        loss_feat = loss_feat + feature_distance(head_feature, main_feature, params.feat_loss)
    loss = params.ce_weight * loss_ce + params.kd_weight * loss_kd + params.feat_weight * loss_feat
    return {"loss": loss, "loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach(), "loss_feat": loss_feat.detach()}


@METHODS.register
class BeYourOwnTeacher(AuxiliaryHeadMethod):
    name = "byot"
    summary = "be your own teacher: the deepest classifier teaches auxiliary heads (Zhang et al. 2019)"
    Params = BYOTParams

    def loss(self, net, batch) -> StepResult:
        out = net(batch.images)
        if self.params.feat_loss == "map_mse":
            main_feature, aux_features = out["stages"][-1], out["aux_features"]
        else:
            main_feature, aux_features = out["embedding"], out["aux_embeddings"]
        result = byot_loss(out["logits"], out["aux_logits"], main_feature, aux_features, batch.labels, self.params)
        return StepResult.of(result, out["logits"], batch.labels)
