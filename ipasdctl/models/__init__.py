"""Registered architectures, all following the contract in models/base.py."""

from __future__ import annotations

from typing import Optional

from ..registry import import_submodules
from .base import MODELS, ClassifierBase, count_macs, count_params
from .structure import apply_structure

import_submodules(__name__, __path__, skip=("base", "catalog", "structure", "timm_models", "weights"))  # each registers its own


def build_model(arch: str, num_classes: int, structure: Optional[dict] = None) -> ClassifierBase:
    """A registered architecture, or `timm:<name>` for any model timm builds (models/timm_models.py); with
    `structure` (a pruned run's model.structure), its layers built to the recorded shapes (models/structure.py)."""
    from .timm_models import build_timm_model, is_timm_arch

    model = build_timm_model(arch, num_classes) if is_timm_arch(arch) else MODELS.get(arch)(num_classes)
    if structure:
        apply_structure(model, structure, arch)
    return model


__all__ = ["MODELS", "ClassifierBase", "build_model", "count_macs", "count_params"]
