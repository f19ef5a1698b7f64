"""Data sets (registered by name) and the device-resident batch pipeline."""

from __future__ import annotations

from ..registry import import_submodules
from .base import DATASETS, Augment, Batch, ImageData, RandomBatches, TensorLoader, eval_batches

import_submodules(__name__, __path__, skip=("base", "files", "samplers"))  # each module registers its data sets


def build_data(cfg) -> ImageData:
    """The data set named in the recipe, with the optional class-balanced training subset applied."""
    data = DATASETS.get(cfg.name)(cfg)
    if cfg.train_subset is not None:
        data = data.subset(cfg.train_subset, cfg.subset_seed)
    return data


__all__ = ["DATASETS", "Augment", "Batch", "ImageData", "RandomBatches", "TensorLoader", "build_data", "eval_batches"]
