"""Registered architectures, all following the contract in models/base.py."""

from __future__ import annotations

from ..registry import MODELS
from . import cifar_resnet  # noqa: F401  (registration)
from .base import ClassifierBase


def build_model(arch: str, num_classes: int) -> ClassifierBase:
    return MODELS.get(arch)(num_classes)


__all__ = ["ClassifierBase", "build_model"]
