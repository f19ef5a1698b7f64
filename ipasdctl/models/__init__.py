"""Registered architectures, all following the contract in models/base.py."""

from __future__ import annotations

from ..registry import import_submodules
from .base import MODELS, ClassifierBase, count_macs, count_params

import_submodules(__name__, __path__, skip=("base", "catalog", "timm_models", "weights"))  # each registers its own


def build_model(arch: str, num_classes: int) -> ClassifierBase:
    """A registered architecture, or `timm:<name>` for any model timm builds (models/timm_models.py)."""
    from .timm_models import build_timm_model, is_timm_arch

    if is_timm_arch(arch):
        return build_timm_model(arch, num_classes)
    return MODELS.get(arch)(num_classes)


__all__ = ["MODELS", "ClassifierBase", "build_model", "count_macs", "count_params"]
