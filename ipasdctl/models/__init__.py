"""Registered architectures, all following the contract in models/base.py."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import MODELS
from .base import ClassifierBase

# every module in this package registers its architectures on import
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def build_model(arch: str, num_classes: int) -> ClassifierBase:
    return MODELS.get(arch)(num_classes)


__all__ = ["ClassifierBase", "build_model"]
