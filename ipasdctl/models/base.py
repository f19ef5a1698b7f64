"""The model contract every registered architecture follows.

`model(x)` returns logits (what evaluation and ONNX export use). `model(x, with_features=True)` returns
`(logits, embedding, stages)`: the embedding is the globally pooled penultimate feature (the input of the
final linear layer) and `stages` the feature maps after each stage (auxiliary heads attach there);
`stages[-1]` is exactly the map that is pooled into the embedding (dense per-location logits use it).
Attributes: `embed_dim`, `stage_channels`, `num_classes`, and `classifier` (the final nn.Linear).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry

MODELS: Registry = Registry("arch")


class ClassifierBase(nn.Module):
    embed_dim: int
    stage_channels: list[int]
    num_classes: int
    classifier: nn.Linear
    default_input_size: int = 32  # the input side the architecture is designed for (224: ImageNet models)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last feature map, ready to pool; the list of stage outputs)."""
        raise NotImplementedError

    def add_classifier(self, embed_dim: int, num_classes: int) -> None:
        """The final linear layer on the pooled embedding and the contract's sizes; then the weights' init
        (call it last in a constructor, after every other layer)."""
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.classifier = nn.Linear(embed_dim, num_classes)
        init_weights(self)

    def run_stages(self, out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pass `out` through `self.stages` in order: (the last output, every stage's output)."""
        stages = []
        for stage in self.stages:
            out = stage(out)
            stages.append(out)
        return out, stages

    def forward(self, x: torch.Tensor, with_features: bool = False):
        last, stages = self.features(x)
        embedding = torch.flatten(nn.functional.adaptive_avg_pool2d(last, 1), 1)
        logits = self.classifier(embedding)
        if with_features:
            return logits, embedding, stages
        return logits


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_shape, device) -> int:
    """Multiply-accumulates of one forward at batch 1 (FLOPs / 2, torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops() // 2)
