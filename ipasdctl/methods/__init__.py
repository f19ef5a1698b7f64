"""Registered training methods (one file each), all behind the contract in methods/base.py."""

from __future__ import annotations

import dataclasses

from ..registry import import_submodules
from .base import METHODS, Collectives, Method, MethodContext, StepResult, TrainingNet

import_submodules(__name__, __path__, skip=("base",))  # each module registers its method(s): a file adds one


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def resolved_method_config(method_cfg: dict) -> dict:
    """{"name": ..., every parameter with its default filled in}, values checked: what config.yaml records.
    `method_cfg` is a recipe's method section (it has a name: config.Recipe gives one to a section without)."""
    cls = method_class(method_cfg.get("name"))
    return {"name": cls.name, **dataclasses.asdict(cls.parse_params(method_cfg))}


def build_method(method_cfg: dict, ctx: MethodContext) -> Method:
    cls = method_class(method_cfg.get("name"))
    return cls(cls.parse_params(method_cfg), ctx)


__all__ = ["METHODS", "Collectives", "Method", "MethodContext", "StepResult", "TrainingNet", "build_method",
           "method_class", "resolved_method_config"]
