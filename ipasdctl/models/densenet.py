"""DenseNet-BC for 32x32 inputs (Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional
Networks", CVPR 2017).

DenseNet-BC-100 with growth rate k = 12: a 3x3 stem with 2k channels; three dense blocks of
(100 - 4) / 6 = 16 bottleneck layers each, every layer BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k) whose
output is concatenated to its input; between blocks a transition BN-ReLU-1x1 conv halving the channels
(compression 0.5) and 2x2 average pooling; a final BN-ReLU and global pooling. No dropout.
Channels: 24 -> 216 (block 1) -> 108 -> 300 (block 2) -> 150 -> 342 (block 3). Stages: the outputs of the
three dense blocks (216 ch at 32x32, 300 at 16x16, and the final BN-ReLU of block 3, 342 at 8x8, the map that
is pooled). 0.8M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, ClassifierBase


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(ClassifierBase):
    default_input_size = 32

    def __init__(self, depth: int, growth: int, num_classes: int, compression: float = 0.5, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("DenseNet-BC depth must be 6n+4")
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        blocks, transitions, stage_channels = [], [], []
        for i in range(3):
            layers = []
            for _ in range(layers_per_block):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            blocks.append(nn.Sequential(*layers))
            stage_channels.append(channels)
            if i < 2:
                out_channels = int(channels * compression)
                transitions.append(Transition(channels, out_channels))
                channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.bn = nn.BatchNorm2d(channels)
        self.stage_channels = stage_channels
        self.add_classifier(channels, num_classes)

    def features(self, x):
        out = self.conv1(x)
        stages = []
        for i, block in enumerate(self.blocks):
            out = block(out)
            stages.append(out)
            if i < len(self.transitions):
                out = self.transitions[i](out)
        stages[-1] = F.relu(self.bn(out))
        return stages[-1], stages


MODELS.register("densenet_bc100")(lambda num_classes: DenseNetBC(100, 12, num_classes))
