"""Declared parameters: the `Params` dataclass of a method or a data set, each field's bounds stated on it.

A field declared with `param(default, gt=0)` carries a `Declared` in its metadata; `check_declared` checks every
such field of a parsed Params in one place, so a method's `check_params` keeps only the checks that involve
several fields. The declaration also says how `tune` may search the parameter (`tune=(low, high)`, `log=True`
for a log scale): `ipasdctl tune` searches every field with a range (studies/space.py).

    @dataclass
    class LabelSmoothingParams:
        eps: float = param(0.1, ge=0, lt=1)          # 0 <= eps < 1
        T: float = param(4.0, gt=0, tune=(1, 8))     # T > 0; tune searches 1..8
        kind: str = param("map_mse", choices=("map_mse", "pooled_masked_sum"))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from .errors import UserError

DECLARED = "ipasdctl.declared"  # the metadata key of a field's declaration


@dataclass
class NoParams:
    """The Params of a method or data set that takes none."""


@dataclass(frozen=True)
class Declared:
    """What one parameter may be: bounds (None: unbounded on that side), or a list of choices; and how `tune`
    searches it (`tune`: the (low, high) range; `log`: sample on a log scale). None values pass (an Optional
    parameter left unset)."""

    gt: Optional[float] = None  # value > gt
    ge: Optional[float] = None  # value >= ge
    lt: Optional[float] = None  # value < lt
    le: Optional[float] = None  # value <= le
    choices: Optional[tuple] = None
    tune: Optional[tuple[float, float]] = None  # the range `tune` searches (within the bounds)
    log: bool = False  # `tune` samples log-uniformly in `tune`

    def holds(self, value: Any) -> bool:
        if value is None:
            return True
        if self.choices is not None:
            return value in self.choices
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def requirement(self) -> str:
        """What a value must do, for the message '... must <this>, got ...': 'be positive', 'not be negative',
        'be in [0, 1)', 'be one of a, b', ..."""
        if self.choices is not None:
            return f"be one of {', '.join(str(c) for c in self.choices)}"
        low = (self.gt, "(") if self.gt is not None else (self.ge, "[") if self.ge is not None else None
        high = (self.lt, ")") if self.lt is not None else (self.le, "]") if self.le is not None else None
        if low and high:
            return f"be in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
        if low:
            if low[0] == 0:
                return "be positive" if low[1] == "(" else "not be negative"
            return f"be {'greater than' if low[1] == '(' else 'at least'} {_number(low[0])}"
        if high:
            return f"be {'less than' if high[1] == ')' else 'at most'} {_number(high[0])}"
        return "be any value"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def param(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None, lt: Optional[float] = None,
          le: Optional[float] = None, choices: Optional[Sequence] = None, tune: Optional[tuple[float, float]] = None,
          log: bool = False) -> Any:
    """A dataclass field with its default and its declaration (see the module docstring)."""
    if tune is not None and log and min(tune) <= 0:
        raise ValueError(f"a log-scale tuning range must be positive, got {tune}")
    declared = Declared(gt, ge, lt, le, tuple(choices) if choices is not None else None,
                        tuple(tune) if tune is not None else None, log)
    return dataclasses.field(default=default, metadata={DECLARED: declared})


def declarations(params_class: type) -> Iterator[tuple[str, Declared]]:
    """(field name, declaration) of every declared field of a Params class, in field order."""
    for item in dataclasses.fields(params_class):
        if DECLARED in item.metadata:
            yield item.name, item.metadata[DECLARED]


def check_declared(params: Any, where: str) -> None:
    """Every declared field of `params` within its declaration, or a UserError naming the recipe key
    (`where`.field) and what it must be."""
    for name, declared in declarations(type(params)):
        value = getattr(params, name)
        if isinstance(value, float) and math.isnan(value) or not declared.holds(value):
            shown = f"'{value}'" if isinstance(value, str) else str(value)
            raise UserError(f"{where}.{name} must {declared.requirement()}, got {shown}")
