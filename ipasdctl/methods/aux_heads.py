"""Auxiliary classifier heads after intermediate stages, shared by BYOT and DKS (training only).

Each head is the BYOT bottleneck branch (Zhang et al., ICCV 2019; luanyunteng/pytorch-be-your-own-teacher):
    1x1 conv C_s -> C/4, BN, ReLU;  k x k conv with stride k, BN, ReLU;  1x1 conv -> C, BN, ReLU;
    global average pooling;  linear C -> K
with C the width of the last stage and k the downsampling between stage s and the last stage, so the head's
feature map has the shape of the backbone's last map (a feature loss can compare them element-wise).

Readings chosen:
- Self-KD-Lib builds its heads as copies of the backbone's remaining residual stages (one or two blocks per
  stage); that needs the backbone's block type. These heads are architecture-agnostic, built from
  `stage_channels` and `num_classes` alone, as the BYOT paper's bottleneck branches.
- The stage-to-last-stage downsampling is taken as 2 per stage (true of every CIFAR ResNet here and of both
  reference code bases). If a stage's map does not have k times the last map's size, it is first resized
  to that size by adaptive average pooling, so any architecture works and the shapes still match.
- Which stages get a head: `aux_stages` (0-based, intermediate stages only). The default, the last two
  intermediate stages, gives Self-KD-Lib's three classifiers on a 4-stage ResNet-18 (heads after stages
  2 and 3) and heads after both intermediate stages of a 3-stage CIFAR ResNet. The BYOT original puts a
  head after every intermediate stage: aux_stages=[0, 1, 2] on a 4-stage network.

The module lives in `TrainingNet.extra`: the engine trains it with the backbone, checkpoints it under
"extra", and evaluates/exports `TrainingNet.model` alone, so the heads never reach a deployed model.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.base import init_weights
from .base import Method, MethodContext


def resolve_aux_stages(stage_channels: Sequence[int], aux_stages: Optional[Sequence[int]]) -> list[int]:
    """The 0-based stages that get a head: checked against the model; None -> the last two intermediate ones."""
    num_stages = len(stage_channels)
    if num_stages < 2:
        raise UserError(f"auxiliary heads need a model with at least 2 stages; this one has {num_stages}: "
                        "choose another --arch")
    if aux_stages is None:
        return list(range(max(0, num_stages - 3), num_stages - 1))
    stages = list(aux_stages)
    if not stages:
        raise UserError("method.aux_stages is empty; name at least one intermediate stage (e.g. [0, 1])")
    bad = [s for s in stages if not 0 <= s < num_stages - 1]
    if bad or len(set(stages)) != len(stages):
        raise UserError(f"method.aux_stages={stages}: each must be a distinct intermediate stage, 0.."
                        f"{num_stages - 2} for this model ({num_stages} stages; the last one is the main head's)")
    return sorted(stages)


class BottleneckHead(nn.Module):
    """Stage map -> (head feature map shaped like the last stage's map, its pooled vector, logits)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: int, num_classes: int):
        super().__init__()
        mid = max(out_channels // 4, 1)
        self.downsample = downsample
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, downsample, stride=downsample, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(out_channels, num_classes)

    def forward(self, stage_map: torch.Tensor, last_hw: tuple[int, int]):
        want = (last_hw[0] * self.downsample, last_hw[1] * self.downsample)
        if tuple(stage_map.shape[-2:]) != want:  # an architecture that does not halve per stage
            stage_map = F.adaptive_avg_pool2d(stage_map, want)
        feature_map = self.body(stage_map)
        pooled = torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)
        return feature_map, pooled, self.classifier(pooled)


class AuxiliaryHeads(nn.Module):
    """forward(backbone outputs) -> {"aux_logits", "aux_features" (maps), "aux_embeddings"}, shallow first."""

    def __init__(self, stage_channels: Sequence[int], num_classes: int, aux_stages: Optional[Sequence[int]] = None):
        super().__init__()
        self.stages = resolve_aux_stages(stage_channels, aux_stages)
        last = len(stage_channels) - 1
        self.heads = nn.ModuleList(
            BottleneckHead(stage_channels[s], stage_channels[-1], 2 ** (last - s), num_classes) for s in self.stages
        )
        init_weights(self)

    def forward(self, out: dict) -> dict:
        stage_maps = out["stages"]
        last_hw = tuple(stage_maps[-1].shape[-2:])
        maps, pooled, logits = [], [], []
        for stage, head in zip(self.stages, self.heads):
            feature_map, vector, head_logits = head(stage_maps[stage], last_hw)
            maps.append(feature_map)
            pooled.append(vector)
            logits.append(head_logits)
        return {"aux_logits": logits, "aux_features": maps, "aux_embeddings": pooled}


class AuxiliaryHeadMethod(Method):
    """A method that trains auxiliary heads beside the backbone (BYOT, DKS) at `params.aux_stages`; the heads
    are its `extra_module`, so they train and checkpoint but never deploy."""

    def __init__(self, params, ctx: MethodContext):
        super().__init__(params, ctx)
        self.heads = AuxiliaryHeads(ctx.stage_channels, ctx.num_classes, params.aux_stages)

    def extra_module(self):
        return self.heads
