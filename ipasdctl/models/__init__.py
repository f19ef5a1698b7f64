"""Registered architectures, all following the contract in models/base.py."""

from __future__ import annotations

from ..registry import import_submodules
from .base import MODELS, ClassifierBase, count_macs, count_params

import_submodules(__name__, __path__, skip=("base", "catalog"))  # each module registers its architectures


def build_model(arch: str, num_classes: int) -> ClassifierBase:
    return MODELS.get(arch)(num_classes)


__all__ = ["MODELS", "ClassifierBase", "build_model", "count_macs", "count_params"]
