"""CIFAR ResNets: the classic 16-32-64 family (He et al. 2016) and the PreAct ResNets of the paper.

Classic: resnet8/20/32/56/110 = 6n+2 layers, BasicBlocks, 1x1-conv shortcuts where the shape changes;
`resnet8x4` is resnet8 with 4x the widths (64-128-256), a common KD student that can overfit CIFAR subsets.
PreAct ResNets (He et al. 2016b, "Identity Mappings in Deep Residual Networks"): 3x3 stem, no max-pool,
pre-activation blocks, widths 64-128-256-512, a final BN-ReLU before pooling. PreAct ResNet-18 / -34 use
basic blocks (2-2-2-2 / 3-4-6-3); PreAct ResNet-50 uses bottleneck blocks (1x1, 3x3 with the stride, 1x1 with
4x expansion; 3-4-6-3), so its stages have 256-512-1024-2048 channels. All take 32x32 inputs by default
(any size works: the output is pooled globally).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .base import MODELS, ClassifierBase


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ClassifierBase):
    default_input_size = 32

    def __init__(self, depth: int, num_classes: int, widths=(16, 32, 64), in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, width, 2 if (i > 0 and j == 0) else 1))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = list(widths)
        self.add_classifier(widths[-1], num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.run_stages(out)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout  # between the two convolutions (wide ResNets' optional dropout)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1 to 4x the width."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(ClassifierBase):
    default_input_size = 32

    def __init__(self, num_blocks, num_classes: int, widths=(64, 128, 256, 512), in_channels: int = 3,
                 block=PreActBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, width, 2 if (i > 0 and j == 0) else 1))
                in_planes = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        channels = [w * block.expansion for w in widths]
        self.bn = nn.BatchNorm2d(channels[-1])  # the final pre-activation before pooling
        self.stage_channels = channels
        self.add_classifier(channels[-1], num_classes)

    def features(self, x):
        out = self.conv1(x)
        out, stages = self.run_stages(out)
        stages[-1] = F.relu(self.bn(out))  # the contract: the last stage output is the map that is pooled
        return stages[-1], stages


for _depth in (8, 20, 32, 56, 110):
    MODELS.register(f"resnet{_depth}")(lambda num_classes, _d=_depth: CifarResNet(_d, num_classes))

MODELS.register("resnet8x4")(lambda num_classes: CifarResNet(8, num_classes, widths=(64, 128, 256)))
MODELS.register("preact_resnet18")(lambda num_classes: PreActResNet((2, 2, 2, 2), num_classes))
MODELS.register("preact_resnet34")(lambda num_classes: PreActResNet((3, 4, 6, 3), num_classes))
MODELS.register("preact_resnet50")(lambda num_classes: PreActResNet((3, 4, 6, 3), num_classes, block=PreActBottleneck))
