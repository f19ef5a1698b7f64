"""torchvision's ImageNet architectures, randomly initialised (weights=None: nothing is downloaded; ImageNet
weights through `model.weights=torchvision[:ENUM]`, runs/weights.py, mapped by `torchvision_key_map`), wrapped
to the model contract of models/base.py. Registered with a `tv_` prefix; default input 224x224.

- ResNet-18/34/50 (He et al. 2016): stages = layer1..layer4 (strides 4, 8, 16, 32); layer4 is pooled.
- MobileNetV2 (Sandler et al. 2018): stages end at features 3, 6, 13 and 18 (24, 32, 96 channels at strides
  4, 8, 16, and the final 1x1 convolution's 1280-channel map at stride 32, the pooled map).
- MobileNetV3-Small/Large (Howard et al. 2019): stages end at the last block of strides 4, 8, 16 and 32 (the
  576 / 960-channel last convolution). Its head is pool -> Linear(576 / 960 -> 1024 / 1280) -> Hardswish ->
  Dropout -> Linear; the input of the final linear layer is therefore the output of that hidden layer, not a
  pooled map. To keep the contract exactly (`stages[-1]` pooled is the embedding) the hidden vector is the
  embedding and is also returned as a fifth, 1x1 stage. Auxiliary heads work as on any model; dense
  per-location logits (zipf-ls) see a single location on these two models.
- ShuffleNetV2 1x (Ma et al. 2018): stages = the max-pooled stem (24 ch, stride 4), stage2, stage3, and
  stage4 followed by conv5 (1024 ch, stride 32, pooled).
- EfficientNet-B0 (Tan, Le 2019): stages end at features 2, 3, 5 and 8 (24, 40, 112 channels at strides 4, 8,
  16, and the 1280-channel head convolution at stride 32); stochastic depth as torchvision (0.2).
The dropout that torchvision puts before the final linear layer (MobileNetV2/V3, EfficientNet: 0.2) is kept,
between the embedding and the classifier, in training only. torchvision's own weight initialisation is kept.
torchvision is imported when one of these models is built, not when the registry is loaded (importing it
costs seconds: it pulls in torch._dynamo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, ClassifierBase


class TorchvisionClassifier(ClassifierBase):
    """Shared forward: pool the last map, dropout (training only, 0 for most), the final linear layer."""

    default_input_size = 224
    dropout: nn.Module

    def forward(self, x: torch.Tensor, with_features: bool = False):
        last, stages = self.features(x)
        embedding = torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)
        logits = self.classifier(self.dropout(embedding))
        if with_features:
            return logits, embedding, stages
        return logits


class TorchvisionResNet(TorchvisionClassifier):
    def __init__(self, net, num_classes: int):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.classifier = net.fc
        self.dropout = nn.Identity()
        self.stage_channels = [_last_channels(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
        self.embed_dim = net.fc.in_features
        self.num_classes = num_classes

    def features(self, x):
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            stages.append(out)
        return out, stages


def _last_channels(layer: nn.Sequential) -> int:
    """Output width of a ResNet layer: its last block's last BatchNorm (bn3 in bottlenecks, bn2 in basic blocks)."""
    block = layer[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


class SequentialFeatures(TorchvisionClassifier):
    """A torchvision `features` Sequential cut into stages after the given module indices."""

    def __init__(self, features: nn.Sequential, stage_ends: list[int], stage_channels: list[int],
                 classifier: nn.Linear, dropout: float, num_classes: int, head: nn.Module | None = None):
        super().__init__()
        self.body = features
        self.stage_ends = list(stage_ends)
        self.head = head  # MobileNetV3's hidden layer on the pooled vector
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = classifier
        self.stage_channels = list(stage_channels)
        self.embed_dim = classifier.in_features
        self.num_classes = num_classes

    def features(self, x):
        stages = []
        ends = set(self.stage_ends)
        for index, module in enumerate(self.body):
            x = module(x)
            if index in ends:
                stages.append(x)
        if self.head is not None:
            vector = self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
            x = vector[:, :, None, None]
            stages.append(x)
        return x, stages


class TorchvisionShuffleNet(TorchvisionClassifier):
    def __init__(self, net, num_classes: int):
        super().__init__()
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.stage2, self.stage3, self.stage4, self.conv5 = net.stage2, net.stage3, net.stage4, net.conv5
        self.classifier = net.fc
        self.dropout = nn.Identity()
        # a unit's output is two halves, each as wide as its branch's last convolution
        self.stage_channels = [net.conv1[0].out_channels, 2 * _out_channels(net.stage2), 2 * _out_channels(net.stage3),
                               net.conv5[0].out_channels]
        self.embed_dim = net.fc.in_features
        self.num_classes = num_classes

    def features(self, x):
        stem = self.maxpool(self.conv1(x))
        s2 = self.stage2(stem)
        s3 = self.stage3(s2)
        last = self.conv5(self.stage4(s3))
        return last, [stem, s2, s3, last]


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _sequential_model(net, stage_ends: list[int], num_classes: int) -> SequentialFeatures:
    """MobileNetV2 / EfficientNet: classifier = Sequential(Dropout, Linear)."""
    dropout, linear = net.classifier[0], net.classifier[1]
    channels = [_out_channels(net.features[i]) for i in stage_ends]
    return SequentialFeatures(net.features, stage_ends, channels, linear, dropout.p, num_classes)


def _mobilenet_v3(net, stage_ends: list[int], num_classes: int) -> SequentialFeatures:
    hidden, activation, dropout, linear = net.classifier
    channels = [_out_channels(net.features[i]) for i in stage_ends] + [hidden.out_features]
    return SequentialFeatures(net.features, stage_ends, channels, linear, dropout.p, num_classes,
                              head=nn.Sequential(hidden, activation))


def _build(arch: str, num_classes: int):
    """torchvision.models.<arch>, randomly initialised (weights=None: no download)."""
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


TORCHVISION_ARCHS: dict[str, tuple[str, object]] = {}  # registered name -> (torchvision's name, wrapper)


def _register(name: str, arch: str, wrap) -> None:
    TORCHVISION_ARCHS[name] = (arch, wrap)
    MODELS.register(name)(lambda num_classes: wrap(_build(arch, num_classes), num_classes))


def torchvision_key_map(name: str) -> dict[str, str]:
    """torchvision's state-dict name -> the wrapped model's, for a registered `tv_*` architecture: the wrapper
    holds torchvision's own modules under other names, so each tensor is matched by identity (built on the meta
    device: no memory, no init)."""
    arch, wrap = TORCHVISION_ARCHS[name]
    with torch.device("meta"):
        net = _build(arch, 1000)
        wrapped = wrap(net, 1000)
    ours = {id(tensor): key for key, tensor in wrapped.state_dict(keep_vars=True).items()}
    return {key: ours[id(tensor)] for key, tensor in net.state_dict(keep_vars=True).items() if id(tensor) in ours}


for _depth in (18, 34, 50):
    _register(f"tv_resnet{_depth}", f"resnet{_depth}", TorchvisionResNet)
_register("tv_mobilenet_v2", "mobilenet_v2", lambda net, k: _sequential_model(net, [3, 6, 13, 18], k))
_register("tv_mobilenet_v3_small", "mobilenet_v3_small", lambda net, k: _mobilenet_v3(net, [1, 3, 8, 12], k))
_register("tv_mobilenet_v3_large", "mobilenet_v3_large", lambda net, k: _mobilenet_v3(net, [3, 6, 12, 16], k))
_register("tv_shufflenet_v2_x1_0", "shufflenet_v2_x1_0", TorchvisionShuffleNet)
_register("tv_efficientnet_b0", "efficientnet_b0", lambda net, k: _sequential_model(net, [2, 3, 5, 8], k))
