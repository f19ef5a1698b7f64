"""MixSKD: self-knowledge distillation from mixup, between heads and a self-teacher on interpolated features.

Yang, Zhou, Xu, An, Sun, Zhang, Xu, Zhang, "MixSKD: Self-Knowledge Distillation from Mixup for Image
Recognition", ECCV 2022 (release: winycg/Self-KD-Lib main_mixskd_cifar.py, models/resnet_mixskd.py,
methods/adversarial.py). Per batch of B, one lam ~ Beta(a, a) and one permutation pi; x~ = lam x + (1-lam) x[pi];
one forward of [x; x~] (2B rows). Heads h = 1..S: S-1 auxiliary heads after the intermediate stages, then the
backbone's own head; each has logits z_h and a last feature map F_h. For a per-sample tensor t,
t^ = lam t(x) + (1-lam) t(x)[pi] (interpolated from the clean rows). Self-teacher t(.): the S maps concatenated
-> 1x1 conv to C (no bias) -> pooling -> linear. D_h: Linear(C, 128)-ReLU-Linear(128, 2) on pooled maps.
    loss = ce_weight [ sum_h CE(z_h(x), y) + sum_h mixCE(z_h(x~)) + mixCE(t(F^)) + mixCE(t(F(x~))) ]
         + kd_weight [ sum_{h<S} (KL_T(z^_h <- z_h(x~)) + KL_T(z_h(x~) <- z^_h))
                       + KL_T(z^_S <- t(F(x~))) + KL_T(z_S(x~) <- t(F^)) ]
         + feat_weight sum_h MSE(F^_h, F_h(x~)) + adv_weight sum_h BCE(D_h([F^_h; F_h(x~)]), [(1,0)^B; (0,1)^B])
with mixCE(z) = lam CE(z, y) + (1-lam) CE(z, y[pi]) and KL_T(s <- t) = T^2 mean KL(p_T(t) || p_T(s)), t detached.
Defaults are the release's CIFAR ones: a 0.4, T 3, every weight 1, 128 hidden units. The recipe's batch size
B means 2B images per forward (the release's batch 64 is 128 per forward).

Defects of the CIFAR release, fixed here (`mixup_ce=false, adversary=frozen` reproduces the release exactly):
- The mixup cross-entropies (the bracket's second half) are computed and logged but never added to the loss
  (its ImageNet script adds them): the self-teacher then gets no gradient at all, stays at its random
  initialisation, and the backbone's head distils from a random read-out. `mixup_ce` (default true) adds
  them; with it false the self-teacher is frozen (requires_grad false), as it is in effect in the release.
- The discriminators sit in a plain Python list: never registered, trained or saved (fixed random MLPs), and
  the network minimises their loss, i.e. is rewarded for keeping the two kinds of maps distinguishable while
  the MSE pulls them together. The paper describes an adversarial game; `adversary=reverse` (default)
  registers and trains them through a gradient reversal on their inputs: one backward trains D_h to tell F^_h
  from F_h(x~) and the network to make them indistinguishable (the loss value is unchanged). `joint`: D
  registered and trained, the network minimising the same loss (what the release would do were the list a
  ModuleList); `frozen`: the release's fixed random D.
- Evaluation and export use the backbone and its own head alone (the network that ships), not the best of
  the four heads at the best epoch; the heads, the self-teacher and the discriminators are training-only
  (`extra_module`), like BYOT's heads.
- One recipe for every method of a comparison (the release trains MixSKD with batch 64 for 205 epochs and its
  CE baseline with 128 for 200); the models' stem has its ReLU (the release's MixSKD backbone lacks it);
  under several processes each rank mixes its own sub-batch (the release's DataParallel splits pairs).
Reading chosen: the auxiliary heads are aux_heads.py's bottleneck branches (as BYOT and DKS here), built from
the stage widths, not copies of the backbone's later stages: any architecture with stages works, and each
head's map has the last stage's shape, as the self-teacher and the feature loss need. `aux_stages` None puts
a head after every intermediate stage (the release: 3 on a 4-stage ResNet-18).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..params import param
from .aux_heads import AuxiliaryHeads, resolve_aux_stages
from .base import METHODS, Method, MethodContext, StepResult
from .losses import distill_kl, mixed_cross_entropy, mixup_draw
from .zipf_ls import unwrap_training_net

ADVERSARIES = ("reverse", "joint", "frozen")


@dataclass
class MixSKDParams:
    alpha: float = param(0.4, ge=0)  # Beta(alpha, alpha); 0: no mixing
    T: float = param(3.0, gt=0)
    mixup_ce: bool = True  # false: the CIFAR release (mixup cross-entropies logged, not trained on)
    adversary: str = param("reverse", choices=ADVERSARIES)  # reverse | joint | frozen (the release)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    feat_weight: float = 1.0
    adv_weight: float = 1.0
    disc_hidden: int = param(128, ge=1)
    aux_stages: Optional[list[int]] = None  # 0-based stages with a head; None: every intermediate stage


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward: what is upstream maximises what is downstream minimises."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class SelfTeacher(nn.Module):
    """The S maps concatenated on channels -> 1x1 conv to C (no bias, BN or ReLU) -> pooling -> linear."""

    def __init__(self, num_maps: int, channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(num_maps * channels, channels, 1, bias=False)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = self.conv(torch.cat(list(maps), dim=1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1))


def discriminator(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))


class MixSKDModules(nn.Module):
    """The training-only parts: the auxiliary heads (run inside the network's forward), the self-teacher and
    the discriminators (run by the loss, which knows lam and pi)."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int, aux_stages: list[int], params: MixSKDParams):
        super().__init__()
        self.heads = AuxiliaryHeads(stage_channels, num_classes, aux_stages)
        channels = stage_channels[-1]
        self.teacher = SelfTeacher(len(aux_stages) + 1, channels, num_classes)
        self.discriminators = nn.ModuleList(discriminator(channels, params.disc_hidden) for _ in range(len(aux_stages) + 1))
        if not params.mixup_ce:  # it gets no gradient then: frozen, so optimisers and DDP skip it
            self.teacher.requires_grad_(False)
        if params.adversary == "frozen":
            self.discriminators.requires_grad_(False)

    def forward(self, out: dict) -> dict:
        return self.heads(out)


def interpolate(rows: torch.Tensor, lam: float, index: torch.Tensor, size: int) -> torch.Tensor:
    """lam t(x) + (1 - lam) t(x)[pi] from the clean rows (the first `size`) of a [x; x~] tensor."""
    clean = rows[:size]
    return lam * clean + (1 - lam) * clean[index]


def adversarial_loss(interpolated: torch.Tensor, mixed: torch.Tensor, disc: nn.Module, reverse: bool) -> torch.Tensor:
    """BCE-with-logits of D on the pooled maps against (1, 0) for the interpolated rows, (0, 1) for the mixed."""
    pooled = torch.flatten(F.adaptive_avg_pool2d(torch.cat([interpolated, mixed]), 1), 1)
    if reverse:
        pooled = GradientReversal.apply(pooled)
    size = interpolated.shape[0]
    kind = (torch.arange(2 * size, device=pooled.device) >= size).long()
    return F.binary_cross_entropy_with_logits(disc(pooled), F.one_hot(kind, 2).to(pooled.dtype))


def mixskd_loss(logits: Sequence[torch.Tensor], maps: Sequence[torch.Tensor], labels: torch.Tensor, lam: float,
                index: torch.Tensor, teacher: nn.Module, discriminators: Sequence[nn.Module],
                params: MixSKDParams) -> dict:
    """logits: S tensors (2B, K), auxiliary heads shallow first, the backbone's last; maps: their S last feature
    maps (2B, C, H, W); rows [:B] are the clean batch, [B:] its mixed copy x~ = lam x + (1-lam) x[index]."""
    size = labels.shape[0]
    logits = [z.float() for z in logits]
    maps = [m.float() for m in maps]
    interp_logits = [interpolate(z, lam, index, size) for z in logits]
    mixed_logits = [z[size:] for z in logits]
    interp_maps = [interpolate(m, lam, index, size) for m in maps]
    mixed_maps = [m[size:] for m in maps]
    teacher_interp, teacher_mixed = teacher(interp_maps).float(), teacher(mixed_maps).float()

    loss_ce = sum(F.cross_entropy(z[:size], labels) for z in logits)
    loss_mixce = (sum(mixed_cross_entropy(z, labels, lam, index) for z in mixed_logits)
                  + mixed_cross_entropy(teacher_interp, labels, lam, index)
                  + mixed_cross_entropy(teacher_mixed, labels, lam, index))
    T = params.T
    loss_kd = distill_kl(interp_logits[-1], teacher_mixed, T) + distill_kl(mixed_logits[-1], teacher_interp, T)
    for interp, mixed in zip(interp_logits[:-1], mixed_logits[:-1]):
        loss_kd = loss_kd + distill_kl(interp, mixed, T) + distill_kl(mixed, interp, T)
    loss_feat = sum(F.mse_loss(a, b) for a, b in zip(interp_maps, mixed_maps))
    reverse = params.adversary == "reverse"
    loss_adv = sum(adversarial_loss(a, b, d, reverse) for a, b, d in zip(interp_maps, mixed_maps, discriminators))

    classification = loss_ce + loss_mixce if params.mixup_ce else loss_ce
    loss = (params.ce_weight * classification + params.kd_weight * loss_kd + params.feat_weight * loss_feat
            + params.adv_weight * loss_adv)
    return {"loss": loss, "loss_ce": loss_ce, "loss_mixce": loss_mixce, "loss_kd": loss_kd, "loss_feat": loss_feat,
            "loss_adv": loss_adv, "lam": loss.new_full((), lam)}


@METHODS.register
class MixSKD(Method):
    name = "mixskd"
    summary = "self-KD from mixup: feature maps and logits of mixed images teach each other (Yang et al. 2022)"
    Params = MixSKDParams
    changes_images = True

    def __init__(self, params: MixSKDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        channels = ctx.stage_channels
        resolve_aux_stages(channels, None)  # refuses a model without intermediate stages
        stages = resolve_aux_stages(channels, params.aux_stages if params.aux_stages is not None
                                    else list(range(len(channels) - 1)))
        self.parts = MixSKDModules(channels, ctx.num_classes, stages, params)

    def extra_module(self) -> nn.Module:
        return self.parts

    def loss(self, net, batch) -> StepResult:
        images, labels = batch.images, batch.labels
        size = labels.shape[0]
        lam, index = mixup_draw(self.ctx.seed, batch.epoch, batch.step, self.ctx.collectives.rank, size,
                                self.params.alpha, images.device)
        out = net(torch.cat([images, lam * images + (1 - lam) * images[index]]))
        parts = unwrap_training_net(net).extra
        logits = [*out["aux_logits"], out["logits"]]
        maps = [*out["aux_features"], out["stages"][-1]]
        result = mixskd_loss(logits, maps, labels, lam, index, parts.teacher, parts.discriminators, self.params)
        return StepResult.of(result, out["logits"][:size], labels)
