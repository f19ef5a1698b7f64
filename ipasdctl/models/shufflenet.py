"""ShuffleNetV2 1x for 32x32 inputs (Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient
CNN Architecture Design", ECCV 2018).

Units split the channels in two, transform one half (1x1, 3x3 depthwise, 1x1) and shuffle the two halves
together; the first unit of a stage has stride 2 and transforms both halves. Widths of the 1x network: 24 stem,
stages of 116, 232, 464 channels with 4, 8, 4 units, a 1x1 convolution to 1024, global pooling.
CIFAR variant (as the common CIFAR code bases): a 3x3 stride-1 stem and no max-pool, so a 32x32 input is 16x16,
8x8 and 4x4 after the three stages. Stages: the 116- and 232-channel stage outputs and the 1024-channel map
after the last stage and the 1x1 convolution (the map that is pooled).
The ImageNet network is `tv_shufflenet_v2_x1_0` (torchvision_models.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, ClassifierBase


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    batch, channels, height, width = x.shape
    grouped = x.view(batch, groups, channels // groups, height, width)
    return grouped.transpose(1, 2).reshape(batch, channels, height, width)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class ShuffleUnit(nn.Module):
    """Stride 1: split the channels, x1 | branch(x2). Stride 2: left(x) | branch(x), each half the output.
    branch = 1x1-BN-ReLU, 3x3 depthwise (stride)-BN, 1x1-BN-ReLU; left = 3x3 depthwise (stride)-BN, 1x1-BN-ReLU.
    Then the two halves are shuffled (channel_shuffle with 2 groups)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        half = out_channels // 2
        self.stride = stride
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a stride-1 ShuffleNetV2 unit keeps the width")
        self.left = None
        if stride > 1:
            self.left = nn.Sequential(*conv_bn(in_channels, in_channels, 3, stride, groups=in_channels, relu=False),
                                      *conv_bn(in_channels, half, 1))
        branch_in = in_channels if stride > 1 else half
        self.branch = nn.Sequential(*conv_bn(branch_in, half, 1),
                                    *conv_bn(half, half, 3, stride, groups=half, relu=False),
                                    *conv_bn(half, half, 1))

    def forward(self, x):
        if self.left is None:
            kept, transformed = x.chunk(2, dim=1)
            out = torch.cat([kept, self.branch(transformed)], 1)
        else:
            out = torch.cat([self.left(x), self.branch(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Cifar(ClassifierBase):
    default_input_size = 32

    def __init__(self, num_classes: int, widths=(116, 232, 464), repeats=(4, 8, 4), stem_channels: int = 24,
                 last_channels: int = 1024, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        stages, width = [], stem_channels
        for out_channels, n in zip(widths, repeats):
            units = [ShuffleUnit(width, out_channels, 2)]
            units += [ShuffleUnit(out_channels, out_channels, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            width = out_channels
        stages[-1].append(nn.Sequential(nn.Conv2d(width, last_channels, 1, bias=False),
                                        nn.BatchNorm2d(last_channels), nn.ReLU(inplace=True)))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [*widths[:-1], last_channels]
        self.add_classifier(last_channels, num_classes)

    def features(self, x):
        out = self.stem(x)
        return self.run_stages(out)


MODELS.register("shufflenetv2")(lambda num_classes: ShuffleNetV2Cifar(num_classes))
