"""MobileNetV2 for 32x32 inputs (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018).

Inverted residual blocks (1x1 expansion by t, 3x3 depthwise, linear 1x1 projection; a residual connection
where stride is 1 and the width is kept; ReLU6), the paper's table (t, c, n, s): (1,16,1,1) (6,24,2,s)
(6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), then a 1x1 convolution to 1280 and global pooling.
CIFAR variant (as the common CIFAR code bases): the stem convolution has stride 1 and the 24-channel group
stride 1 instead of 2, so a 32x32 input ends at 4x4 instead of 1x1. No dropout before the classifier.
Stages (the outputs at each resolution): 24 ch at 32x32, 32 at 16x16, 96 at 8x8, and the 1280-channel map at
4x4 (the 160 and 320 groups and the final 1x1 convolution), the map that is pooled.
The ImageNet network is `tv_mobilenet_v2` (torchvision_models.py).
"""

from __future__ import annotations

from torch import nn

from .base import MODELS, ClassifierBase

# (expansion t, output channels c, blocks n, stride s of the first block, stage it ends in)
CIFAR_SETTINGS = [
    (1, 16, 1, 1, 0),
    (6, 24, 2, 1, 0),
    (6, 32, 3, 2, 1),
    (6, 64, 4, 2, 2),
    (6, 96, 3, 1, 2),
    (6, 160, 3, 2, 3),
    (6, 320, 1, 1, 3),
]


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion to t x the width (skipped for t = 1), 3x3 depthwise with the stride, linear 1x1 projection;
    x + block(x) where the stride is 1 and the width is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Cifar(ClassifierBase):
    default_input_size = 32

    def __init__(self, num_classes: int, last_channels: int = 1280, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn_relu6(in_channels, 32, 3, 1)
        stage_blocks: list[list[nn.Module]] = [[] for _ in range(4)]
        width = 32
        for t, c, n, s, stage in CIFAR_SETTINGS:
            for i in range(n):
                stage_blocks[stage].append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        stage_blocks[-1].append(conv_bn_relu6(width, last_channels, 1))
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stage_blocks)
        self.stage_channels = [24, 32, 96, last_channels]
        self.add_classifier(last_channels, num_classes)

    def features(self, x):
        out = self.stem(x)
        return self.run_stages(out)


MODELS.register("mobilenetv2")(lambda num_classes: MobileNetV2Cifar(num_classes))
