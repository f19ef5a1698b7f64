"""Losses and helpers several methods share (each method's own loss stays in its file).

    distill_kl(z_s, z_t, T)     = T^2 mean_i KL(softmax(z_t,i / T) || softmax(z_s,i / T)),  teacher detached
                                  (Hinton et al. 2015; BYOT, DKS, CS-KD, DLB, DDGSD)
    soft_cross_entropy(z, q)    = -mean_i sum_c q_ic log softmax(z_i)_c                    (LS, PS-KD, IPASD, USKD)
    non_target_columns(y, K)    = per row, the K-1 class indices other than y_i, in class order  (Zipf-LS, USKD)
    mixup_draw(...)             = one lam ~ Beta(a, a) and one permutation pi per batch, seeded per step  (mixup, MixSKD)
    mixed_cross_entropy(z, y, lam, pi) = lam CE(z, y) + (1 - lam) CE(z, y[pi])                      (mixup, MixSKD)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import step_seed

MIX_STREAM = 2  # the step seeds' stream of the mixing draws (0: batch order, 1: augmentation)


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


def mixup_draw(seed: int, epoch: int, step: int, rank: int, batch_size: int, alpha: float,
               device: torch.device) -> tuple[float, torch.Tensor]:
    """(lam, index) of one batch: lam ~ Beta(alpha, alpha) from NumPy, one per batch (alpha = 0: lam = 1, no
    mixing, as facebookresearch/mixup-cifar10), and a random permutation of the batch (a sample may be its own
    partner). Both drawn on the host from the step's seed, so a resumed run mixes the same pairs and the step
    never reads the device; each rank of a distributed run mixes its own sub-batch with its own draws."""
    stream_seed = step_seed(seed, epoch, step, MIX_STREAM)
    if rank:
        stream_seed = step_seed(stream_seed % (2**31), rank, 0, MIX_STREAM)
    lam = float(np.random.default_rng(stream_seed).beta(alpha, alpha)) if alpha > 0 else 1.0
    index = torch.randperm(batch_size, generator=torch.Generator().manual_seed(stream_seed))
    return lam, index.to(device, non_blocking=True)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, lam: float, index: torch.Tensor) -> torch.Tensor:
    """lam CE(z, y) + (1 - lam) CE(z, y[index]): cross-entropy against lam onehot(y) + (1 - lam) onehot(y[index])."""
    logits = logits.float()
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[index])
