"""CS-KD: class-wise self-knowledge distillation.

Yun, Park, Lee, Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation", CVPR 2020
(alinlab/cs-kd). With x' another sample of x's class, forwarded without gradient:
    loss = CE(z(x), y) + lambda T^2 KL( softmax(z(x') / T) || softmax(z(x) / T) ),   T 4, lambda 1
the KL averaged over the anchors (the authors' sum / batch size).

Machinery: `ClassPairBatches` (data/samplers.py) makes each batch [B anchors, B partners]; every sample is an
anchor once per epoch, the partner is a different random sample of the anchor's class (the anchor itself
only when its class has a single sample). Readings chosen:
- Two forwards in training mode, as the authors: the anchors with gradient, then the partners under
  no_grad. BatchNorm normalises each half with its own batch statistics and its running statistics are
  updated by both forwards (Self-KD-Lib does the same).
- The authors' sampler may pair an anchor with itself; ours excludes it whenever the class allows.
- The loss, the logits and the labels returned are the anchors' (accuracy is counted on anchors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.samplers import ClassPairBatches
from ..params import param
from .base import METHODS, Method, StepResult
from .losses import distill_kl


@dataclass
class CSKDParams:
    T: float = param(4.0, gt=0, tune=(1.0, 8.0))
    kd_weight: float = param(1.0, ge=0, tune=(0.1, 4.0), log=True)  # lambda; the authors use 3 on fine-grained data sets


def class_wise_loss(anchor_logits: torch.Tensor, partner_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float, kd_weight: float) -> dict:
    """CE on the anchors + kd_weight * T^2 KL(p_T(partner) || p_T(anchor)); the partner side is constant."""
    anchor_logits = anchor_logits.float()
    loss_ce = F.cross_entropy(anchor_logits, labels)
    loss_kd = distill_kl(anchor_logits, partner_logits, temperature)
    return {"loss": loss_ce + kd_weight * loss_kd, "loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}


@METHODS.register
class ClassWiseKD(Method):
    name = "cs-kd"
    summary = "class-wise self-KD: another sample of the same class teaches (Yun et al. 2020)"
    Params = CSKDParams

    def batch_plan(self, labels: torch.Tensor, batch_size: int, seed: int):
        return ClassPairBatches(labels, batch_size, seed)

    def loss(self, net, batch) -> StepResult:
        half = batch.labels.shape[0] // 2
        labels = batch.labels[:half]
        anchor_logits = net(batch.images[:half])["logits"]
        with torch.no_grad():
            partner_logits = net(batch.images[half:])["logits"]
        result = class_wise_loss(anchor_logits, partner_logits, labels, self.params.T, self.params.kd_weight)
        return StepResult.of(result, anchor_logits, labels)
