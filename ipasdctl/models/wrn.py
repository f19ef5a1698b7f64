"""Wide residual networks for 32x32 inputs (Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem with 16 channels, then 3 groups of n = (d - 4) / 6 pre-activation basic blocks with
16k, 32k and 64k channels (strides 1, 2, 2), a final BN-ReLU and global pooling. Where a block changes the
shape, its shortcut is a 1x1 convolution of the block's pre-activated input (as the authors' code). Dropout
between the two convolutions of a block (the paper's optional 0.3) is off in the registered models.
Registered: `wrn16_2` (0.7M parameters, a common KD student) and `wrn28_10` (36.5M parameters).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import MODELS, ClassifierBase
from .cifar_resnet import PreActBlock


# A wide ResNet block is the pre-activation basic block with optional dropout between its convolutions.
WideBlock = PreActBlock


class WideResNet(ClassifierBase):
    default_input_size = 32

    def __init__(self, depth: int, widen: int, num_classes: int, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_planes, width, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.stage_channels = widths
        self.add_classifier(widths[-1], num_classes)

    def features(self, x):
        out = self.conv1(x)
        out, stages = self.run_stages(out)
        stages[-1] = F.relu(self.bn(out))  # the pooled map is the final pre-activation
        return stages[-1], stages


MODELS.register("wrn16_2")(lambda num_classes: WideResNet(16, 2, num_classes))
MODELS.register("wrn28_10")(lambda num_classes: WideResNet(28, 10, num_classes))
