"""Registries: one per kind of thing (methods, models, data sets), looked up by name. Each package owns its
registry (methods.METHODS, models.MODELS, data.DATASETS) and fills it by importing its modules
(`import_submodules`): adding a file adds a method, an architecture or a data set."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterable, TypeVar, Union

from .errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object. Unknown or duplicate names are clear errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name_or_obj: Union[str, T]) -> Union[Callable[[T], T], T]:
        """`@REGISTRY.register` on a class with a `name` attribute (the name is stated once, in the class), or
        `REGISTRY.register("name")(factory)`."""
        if not isinstance(name_or_obj, str):
            return self._add(name_or_obj.name, name_or_obj)
        return lambda obj: self._add(name_or_obj, obj)

    def _add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove a registered name (a test's stand-in, registered for the test only)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if not isinstance(name, str):  # a recipe may hold anything there (a list, a mapping)
            raise UserError(f"the {self.kind} must be a name, got {type(name).__name__} {str(name)[:60]}; "
                            f"known: {', '.join(self.names())}")
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


def import_submodules(package: str, path: Iterable[str], skip: tuple[str, ...] = ()) -> list:
    """Import every module of a package (but `skip`), in name order; returns the modules."""
    return [importlib.import_module(f"{package}.{info.name}")
            for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name) if info.name not in skip]
