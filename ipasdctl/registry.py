"""Registries: one per kind of thing (methods, models, data sets), looked up by name."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object. Unknown or duplicate names are clear errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


METHODS: Registry = Registry("method")
MODELS: Registry = Registry("arch")
DATASETS: Registry = Registry("dataset")


def load_all() -> None:
    """Import every module that registers something (cheap: no heavy work at import)."""
    from . import data, methods, models  # noqa: F401
