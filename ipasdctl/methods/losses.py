"""Losses and helpers several methods share (each method's own loss stays in its file).

    distill_kl(z_s, z_t, T)     = T^2 mean_i KL(softmax(z_t,i / T) || softmax(z_s,i / T)),  teacher detached
                                  (Hinton et al. 2015; BYOT, DKS, CS-KD, DLB, DDGSD)
    soft_cross_entropy(z, q)    = -mean_i sum_c q_ic log softmax(z_i)_c                    (LS, PS-KD, IPASD, USKD)
    non_target_columns(y, K)    = per row, the K-1 class indices other than y_i, in class order  (Zipf-LS, USKD)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over the batch, teacher detached, float32."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(1)
    return kl.mean() * (t * t)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (rows of class probabilities), mean over the batch."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def non_target_columns(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K-1) column indices of every class but the label, in class order (for gather: no boolean masks)."""
    columns = torch.arange(num_classes - 1, device=labels.device).unsqueeze(0)
    return columns + (columns >= labels.unsqueeze(1)).long()
