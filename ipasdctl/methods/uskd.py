"""USKD: unified self-knowledge distillation (Yang, Zeng, Li, Zhang, Yuan, Li, "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023;
release: yzd-v/cls_KD, mmcls/distillation/losses/uskd.py).

p = softmax(z), p_t = p_y; w = softmax(z_weak), z_weak = a linear "weak" head on the globally pooled output of
the model's second-to-last stage (trained with the network, dropped for evaluation and export).
    L_target  = -mean_i s_i log p_t,i,   s_i = p_t,i^2 + 1 - mean_batch(p_t^2)   (s detached)
    L_weak    = -mean_i sum_c v_ic log w_ic,   v = 0.9 onehot(y) + 0.1 / K
    rank: score_c = w_c / (1 - w_t) + x_c / (1 - x_t), classes sorted by score (target included), the
          class at position j (0-based) gets 1 / (j + 1); the target is dropped, the rest normalised: n_i
    L_non     = -mean_i sum_{c != y_i} n_ic log softmax_{c != y_i}(z_i)_c   (n detached: no gradient)
    loss = CE(z, y) + alpha L_target + beta L_non + mu L_weak
Readings of the release, each a choice:
- In the release `x` is the student's log-softmax (the variable holding the softmax is reassigned before
  the rank is computed): score = w / (1 - w_t + 1e-6) + log p / (1 - log p_t + 1e-6). That is the default
  (`release_rank=true`); `release_rank=false` uses the probabilities, x = p, as the paper describes the rank.
- L_non is a cross-entropy against the soft non-target labels (as the release), not a KL: the same gradient,
  the value higher by the labels' entropy.
- "Stage-3 feature": the release takes the second-to-last backbone output (`fea_s[-2]`, 256 channels on the
  four-stage CIFAR ResNet-18). The same rule is kept for every model (`weak_stage=-2`): on a three-stage
  CIFAR ResNet (resnet8: 16/32/64) that is the 32-channel stage 2.
Defaults (CIFAR-100, the release's res18_sd_cifar config): alpha 0.1, beta 0.1, mu 0.1 (ImageNet: 1, 0.1, 0.005).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import METHODS, Method, MethodContext, StepResult
from .losses import non_target_columns, soft_cross_entropy

WEAK_LABEL_WEIGHT = 0.9  # the weak head's target: 0.9 onehot + 0.1 / K (fixed in the release)
EPS = 1e-6


@dataclass
class USKDParams:
    alpha: float = 0.1
    beta: float = 0.1
    mu: float = 0.1
    weak_stage: int = -2  # which of the model's stage outputs feeds the weak head
    release_rank: bool = True  # false: rank by probabilities (the paper) instead of the release's log-probabilities


class WeakHead(nn.Module):
    """Linear classifier on the globally pooled output of one stage: {"weak_logits": (N, K)}."""

    def __init__(self, stage_index: int, channels: int, num_classes: int):
        super().__init__()
        self.stage_index = stage_index
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, out: dict) -> dict:
        pooled = torch.flatten(F.adaptive_avg_pool2d(out["stages"][self.stage_index], 1), 1)
        return {"weak_logits": self.fc(pooled)}


@torch.no_grad()
def zipf_non_target_labels(log_p: torch.Tensor, weak_probs: torch.Tensor, labels: torch.Tensor,
                           release_rank: bool = True) -> torch.Tensor:
    """(N, K-1) soft non-target labels (class order, target column removed) from the combined rank score."""
    index = labels.unsqueeze(1)
    w_t = weak_probs.gather(1, index)
    student = log_p if release_rank else log_p.exp()
    student_t = student.gather(1, index)
    score = weak_probs / (1.0 - w_t + EPS) + student / (1.0 - student_t + EPS)
    order = score.argsort(dim=1, descending=True, stable=True)
    position = order.argsort(dim=1)  # where each class sits in the descending order
    zipf = 1.0 / (position + 1).float()
    zipf = zipf.gather(1, non_target_columns(labels, log_p.shape[1]))
    return zipf / zipf.sum(1, keepdim=True)


def uskd_loss(logits: torch.Tensor, weak_logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
              mu: float, release_rank: bool = True) -> dict:
    logits, weak_logits = logits.float(), weak_logits.float()
    num_classes = logits.shape[1]
    index = labels.unsqueeze(1)
    log_p = F.log_softmax(logits, dim=1)
    log_p_t = log_p.gather(1, index)
    p_t_sq = log_p_t.detach().exp() ** 2
    soft_target = p_t_sq + 1.0 - p_t_sq.mean(0, keepdim=True)
    loss_target = -(soft_target * log_p_t).sum(1).mean()

    log_w = F.log_softmax(weak_logits, dim=1)
    weak_target = WEAK_LABEL_WEIGHT * F.one_hot(labels, num_classes).float() + (1.0 - WEAK_LABEL_WEIGHT) / num_classes
    loss_weak = -(weak_target * log_w).sum(1).mean()

    non_target = zipf_non_target_labels(log_p.detach(), log_w.detach().exp(), labels, release_rank)
    loss_non_target = soft_cross_entropy(logits.gather(1, non_target_columns(labels, num_classes)), non_target)

    loss_ce = F.cross_entropy(logits, labels)
    loss = loss_ce + alpha * loss_target + beta * loss_non_target + mu * loss_weak
    return {"loss": loss, "loss_ce": loss_ce, "loss_target": loss_target, "loss_non_target": loss_non_target,
            "loss_weak": loss_weak}


@METHODS.register
class USKD(Method):
    name = "uskd"
    summary = "unified self-KD: normalised loss and customised soft labels (Yang et al. 2023)"
    Params = USKDParams

    def __init__(self, params: USKDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        stages = len(ctx.stage_channels)
        if not -stages <= params.weak_stage < stages:
            raise UserError(f"method.weak_stage={params.weak_stage} is out of range: this model has {stages} "
                            f"stages (use -{stages}..{stages - 1}; -2 is the second-to-last)")
        if ctx.num_classes < 2:
            raise UserError("uskd needs at least 2 classes")

    def extra_module(self) -> nn.Module:
        channels = self.ctx.stage_channels[self.params.weak_stage]
        return WeakHead(self.params.weak_stage, channels, self.ctx.num_classes)

    def loss(self, net, batch) -> StepResult:
        out = net(batch.images)
        p = self.params
        result = uskd_loss(out["logits"], out["weak_logits"], batch.labels, p.alpha, p.beta, p.mu, p.release_rank)
        return StepResult.of(result, out["logits"], batch.labels)
