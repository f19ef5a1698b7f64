"""The table behind `ipasdctl list models`: every registered architecture with its default input size,
parameters and multiply-accumulates (MACs) of one forward pass at batch 1 and that size.

CIFAR-style models declare `default_input_size = 32`, the torchvision ImageNet models 224 (a model without the
attribute is taken as 32). MACs come from `models.count_macs` (torch.utils.flop_counter: FLOPs / 2).
The models are built and run on the `meta` device by default: shapes only, no weights initialised and no
arithmetic done, so the whole table takes seconds; the counts are exactly those of a CPU run (the tests check).
cli/listing.py prints the rows and keeps them in its cache.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import MODELS, build_model, count_macs, count_params

DEFAULT_INPUT_SIZE = 32


def input_size_of(model) -> int:
    return int(getattr(model, "default_input_size", DEFAULT_INPUT_SIZE))


def default_num_classes(input_size: int) -> int:
    """The classes the counts are given for: ImageNet's 1000 at 224 and above, CIFAR-100's 100 below."""
    return 1000 if input_size >= 224 else 100


def model_row(name: str, num_classes: Optional[int] = None, input_size: Optional[int] = None,
              device: str = "meta") -> dict:
    """One architecture: name, input_size, num_classes, params, macs, embed_dim, stage_channels, num_stages.

    `num_classes` None: 100 for the CIFAR-style models, 1000 for the ImageNet ones (default_num_classes).
    """
    def build(classes: int):
        with torch.device(device):
            return build_model(name, classes)

    model = build(num_classes or 100)
    size = input_size or input_size_of(model)
    if num_classes is None and default_num_classes(size) != 100:
        num_classes = default_num_classes(size)
        model = build(num_classes)
    with torch.no_grad():
        macs = count_macs(model, (3, size, size), device)
    return {
        "name": name,
        "input_size": size,
        "num_classes": int(model.num_classes),
        "params": count_params(model),
        "macs": macs,
        "embed_dim": int(model.embed_dim),
        "stage_channels": list(model.stage_channels),
        "num_stages": len(model.stage_channels),
    }


def model_table(names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                device: str = "meta") -> list[dict]:
    """Rows of `model_row` for the given (default: all registered) architectures, in name order.

    Params and MACs are those of a `num_classes`-way classifier; None gives each model its usual data set's
    (CIFAR-100 for the 32x32 models, ImageNet for the 224x224 ones), so the counts match published ones.
    """
    return [model_row(name, num_classes, device=device) for name in (names if names is not None else MODELS.names())]
