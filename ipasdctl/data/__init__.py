"""Data sets (registered by name) and the device-resident batch pipeline."""

from __future__ import annotations

from ..errors import UserError
from ..registry import DATASETS
from . import cifar, digits, imagefolder, imagenet, synthetic, tiny_imagenet  # noqa: F401  (registration)
from .base import Augment, Batch, ImageData, RandomBatches, TensorLoader, eval_batches


def build_data(cfg) -> ImageData:
    """The data set named in the recipe, with the optional class-balanced training subset applied."""
    data = DATASETS.get(cfg.name)(cfg)
    if cfg.train_subset is not None:
        data = data.subset(cfg.train_subset, cfg.subset_seed)
    return data


__all__ = ["Augment", "Batch", "ImageData", "RandomBatches", "TensorLoader", "build_data", "eval_batches", "UserError"]
