"""Zipf's label smoothing (Liang, Li, Zhou, Dong, Zhou, Li, "Efficient One Pass Self-distillation with Zipf's
Label Smoothing", ECCV 2022; release: megvii-research/zipfls, pytorch_zipfls/).

Dense votes: the final linear layer applied at every location of the last feature map (the map that is pooled
into the embedding), argmax per location, counted per class: v_ic. Ranks r_ic = 1 + #{j : v_ij > v_ic}
(ties share the smallest rank, so all classes without a vote share the rank after the last voted class;
scipy's rankdata(method='min'), as the release). Ranks are taken over all K classes, the target included;
then the target is dropped and the rest normalised:
    w_ic = r_ic^-power / sum_{j != y_i} r_ij^-power   (c != y_i)
    loss = CE(z, y) + lambda * mean_i sum_{c != y_i} w_ic log(w_ic / softmax_{c != y_i}(z_i)_c)
where the softmax runs over the non-target logits only. The votes carry no gradient.
Readings of the release: its CIFAR-100 command (`--dense --upsample bilinear --loss_lambda 0.1`, deeplayer 1)
upsamples the last map 2x bilinearly before voting, so `upsample` defaults to bilinear (16 votes become 64 on a
4x4 map); interpolation is linear with weights summing to one, so the logits map is upsampled instead of the
wider feature map (the same votes, cheaper). The release's optional correct-prediction mask (`--mask`, off in
its commands) is not offered. Defaults: lambda 0.1 (1.0 for Tiny ImageNet), power 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..params import param
from .base import METHODS, Method, MethodContext, StepResult
from .losses import non_target_columns

UPSAMPLE_MODES = ("none", "bilinear", "bicubic")


@dataclass
class ZipfLSParams:
    loss_lambda: float = param(0.1, ge=0, tune=(0.01, 1.0), log=True)
    power: float = 1.0
    upsample: str = param("bilinear", choices=UPSAMPLE_MODES)  # none | bilinear | bicubic: 2x upsampling of the dense map before voting


def unwrap_training_net(net: nn.Module) -> nn.Module:
    """The TrainingNet under torch.compile (`_orig_mod`) and (Distributed)DataParallel (`module`) wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        else:
            return net


def min_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Per row, 1 + the number of entries strictly larger (descending ranks, ties share the smallest)."""
    num = scores.shape[1]
    ascending = scores.sort(dim=1).values.contiguous()
    not_larger = torch.searchsorted(ascending, scores.contiguous(), right=True)
    return 1 + num - not_larger


@torch.no_grad()
def dense_votes(feature_map: torch.Tensor, classifier: nn.Linear, upsample: str = "none") -> torch.Tensor:
    """(N, K) counts of the per-location argmax of classifier(feature_map[:, :, h, w]) (in float32)."""
    with torch.autocast(feature_map.device.type, enabled=False):
        weight = classifier.weight.float()
        bias = classifier.bias.float() if classifier.bias is not None else None
        dense = F.linear(feature_map.detach().float().permute(0, 2, 3, 1), weight, bias)  # N, H, W, K
        dense = dense.permute(0, 3, 1, 2)  # N, K, H, W
        if upsample != "none":
            dense = F.interpolate(dense, scale_factor=2.0, mode=upsample, align_corners=False)
        winners = dense.flatten(2).argmax(dim=1)  # N, H*W
        counts = torch.zeros(dense.shape[0], dense.shape[1], device=dense.device)
        return counts.scatter_add_(1, winners, torch.ones_like(winners, dtype=counts.dtype))


def zipf_targets(votes: torch.Tensor, labels: torch.Tensor, power: float) -> torch.Tensor:
    """(N, K-1) Zipf distribution over the non-target classes (in class order) from vote ranks."""
    weights = min_ranks(votes).float().pow(-power)
    weights = weights.gather(1, non_target_columns(labels, votes.shape[1]))
    return weights / weights.sum(1, keepdim=True)


def zipf_ls_loss(logits: torch.Tensor, votes: torch.Tensor, labels: torch.Tensor, loss_lambda: float,
                 power: float) -> dict:
    logits = logits.float()
    columns = non_target_columns(labels, logits.shape[1])
    log_q = F.log_softmax(logits.gather(1, columns), dim=1)
    target = zipf_targets(votes, labels, power)
    loss_zipf = (torch.special.xlogy(target, target) - target * log_q).sum(1).mean()
    loss_ce = F.cross_entropy(logits, labels)
    return {"loss": loss_ce + loss_lambda * loss_zipf, "loss_ce": loss_ce, "loss_zipf": loss_zipf}


@METHODS.register
class ZipfLS(Method):
    name = "zipf-ls"
    summary = "Zipf's label smoothing from dense per-location votes (Liang et al. 2022)"
    Params = ZipfLSParams

    def __init__(self, params: ZipfLSParams, ctx: MethodContext):
        super().__init__(params, ctx)
        if ctx.num_classes < 2:
            raise UserError("zipf-ls needs at least 2 classes")

    def loss(self, net, batch) -> StepResult:
        out = net(batch.images)
        classifier = unwrap_training_net(net).model.classifier
        votes = dense_votes(out["stages"][-1], classifier, self.params.upsample)
        result = zipf_ls_loss(out["logits"], votes, batch.labels, self.params.loss_lambda, self.params.power)
        return StepResult.of(result, out["logits"], batch.labels)
