"""Registered training methods (one file each), all behind the contract in methods/base.py."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import METHODS
from .base import Method, MethodContext, TrainingNet

# every module in this package registers its method(s) on import: adding a file adds a method
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base",):
        importlib.import_module(f"{__name__}.{_info.name}")


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def resolved_method_config(method_cfg: dict) -> dict:
    """{"name": ..., every parameter with its default filled in}: what config.yaml records."""
    import dataclasses

    cls = method_class(method_cfg.get("name", "ipasd"))
    return {"name": method_cfg.get("name", "ipasd"), **dataclasses.asdict(cls.parse_params(method_cfg))}


def build_method(method_cfg: dict, ctx: MethodContext) -> Method:
    cls = method_class(method_cfg.get("name", "ipasd"))
    return cls(cls.parse_params(method_cfg), ctx)


__all__ = ["Method", "MethodContext", "TrainingNet", "build_method", "method_class", "resolved_method_config"]
