"""DDGSD: data-distortion guided self-distillation.

Xu, Liu, "Data-Distortion Guided Self-Distillation for Deep Neural Networks", AAAI 2019 (as Self-KD-Lib's
methods/ddsgd.py computes it). Two augmented views x1, x2 of the batch, logits z1, z2, pooled embeddings f1, f2:
    loss = ce_weight (CE(z1, y) + CE(z2, y)) / 2
         + T^2 [ KL(p_T(z2) || p_T(z1)) + KL(p_T(z1) || p_T(z2)) ]     (each teacher side detached)
         + 5e-4 * MMD(f1, f2),    T 4
    MMD "scalar" (Self-KD-Lib): (mean of every entry of f1 - mean of every entry of f2)^2
    MMD "vector" (the paper's linear-kernel MMD): || mean_i f1_i - mean_i f2_i ||^2

View 1 is the batch's own augmentation (`batch.images`), view 2 a second, independently seeded one of the
same uint8 images (`batch.view(batch.raw, 0)`). Readings chosen:
- One forward of the concatenated 2B views, as Self-KD-Lib: BatchNorm normalises both views together.
- The features are the pooled penultimate embedding (Self-KD-Lib's `embedding=True`), and its MMD term is a
  squared difference of two scalars (the global means), not a vector norm; `mmd=vector` gives the paper's.
- "CE on both views, averaged" is the mean over the 2B rows. Self-KD-Lib divides that mean by 2 once more
  (its criterion is already a mean over 2B): `ce_weight=0.5` reproduces it.
- The logits and labels returned (train accuracy) are view 1's: the view every other method trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import param
from .base import METHODS, Method, StepResult
from .losses import distill_kl

MMD_KINDS = ("scalar", "vector")


@dataclass
class DDGSDParams:
    T: float = param(4.0, gt=0, tune=(1.0, 8.0))
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    mmd_weight: float = 5e-4
    mmd: str = param("scalar", choices=MMD_KINDS)  # scalar (Self-KD-Lib) | vector (the paper's linear-kernel MMD)


def feature_mmd(features_1: torch.Tensor, features_2: torch.Tensor, kind: str) -> torch.Tensor:
    """Squared distance between the mean features of two views (see the module docstring for the kinds)."""
    features_1, features_2 = features_1.float(), features_2.float()
    if kind == "scalar":
        return (features_1.mean() - features_2.mean()) ** 2
    return (features_1.mean(0) - features_2.mean(0)).pow(2).sum()


def ddgsd_loss(logits_1: torch.Tensor, logits_2: torch.Tensor, features_1: torch.Tensor, features_2: torch.Tensor,
               labels: torch.Tensor, params: DDGSDParams) -> dict:
    logits_1, logits_2 = logits_1.float(), logits_2.float()
    loss_ce = 0.5 * (F.cross_entropy(logits_1, labels) + F.cross_entropy(logits_2, labels))
    loss_kd = distill_kl(logits_1, logits_2, params.T) + distill_kl(logits_2, logits_1, params.T)
    loss_mmd = feature_mmd(features_1, features_2, params.mmd)
    loss = params.ce_weight * loss_ce + params.kd_weight * loss_kd + params.mmd_weight * loss_mmd
    return {"loss": loss, "loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach(), "loss_mmd": loss_mmd.detach()}


@METHODS.register
class DataDistortionSD(Method):
    name = "ddgsd"
    summary = "data-distortion guided self-distillation: two augmented views teach each other (Xu, Liu 2019)"
    Params = DDGSDParams
    changes_images = True  # a second, independently distorted view of every image

    def loss(self, net, batch) -> StepResult:
        view_2 = batch.view(batch.raw, 0)
        size = batch.labels.shape[0]
        out = net(torch.cat([batch.images, view_2]))
        logits, features = out["logits"], out["embedding"]
        result = ddgsd_loss(logits[:size], logits[size:], features[:size], features[size:], batch.labels, self.params)
        return StepResult.of(result, logits[:size], batch.labels)
