"""The search space of `ipasdctl tune`: which recipe keys a study samples, over which ranges.

By default: every parameter of the method whose `Params` field declares a tuning range (`param(..., tune=(low,
high), log=True)`, methods/*.py), plus `optim.lr` (a decade either side of the recipe's, log scale) and
`optim.weight_decay` (1e-5 to 1e-3, log scale). `--space FILE` replaces it with the keys the file names:

    method.w_div: [0.2, 1.0]                       # a range (integers when both ends are integers)
    optim.lr: {low: 0.01, high: 0.5, log: true}    # a range on a log scale
    method.memory_dtype: {choices: [float16, float32]}
    optim.momentum: 0.9                            # fixed: not searched, set in every trial

A key must be `method.<parameter of the study's method>` or `optim.<numeric key>`; a range must lie within the
parameter's declared bounds. Every mistake is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import OptimConfig, Recipe, deep_merge, read_yaml
from ..errors import UserError, did_you_mean
from ..methods import METHODS, method_class
from ..params import Declared, declarations

WEIGHT_DECAY_RANGE = (1e-5, 1e-3)
LR_DECADES = 10.0  # optim.lr searches recipe lr / 10 .. recipe lr * 10


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) recipe key."""

    key: str  # dotted recipe key: method.w_div, optim.lr
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    choices: Optional[tuple] = None
    fixed: Any = None  # set when neither a range nor choices: the value every trial uses

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.low is None:
            return self.fixed
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {{{', '.join(str(c) for c in self.choices)}}}"
        if self.low is None:
            return f"{self.key} = {self.fixed}"
        return f"{self.key} in [{self.low:g}, {self.high:g}]{' (log)' if self.log else ''}"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False)} | {"key": self.key}


def _method_fields(method: str) -> dict[str, tuple[Any, Optional[Declared]]]:
    """Parameter name -> (its type, its declaration or None) of a method's Params."""
    params_class = method_class(method).Params
    hints = typing.get_type_hints(params_class)
    declared = dict(declarations(params_class))
    return {f.name: (hints[f.name], declared.get(f.name)) for f in dataclasses.fields(params_class)}


def _optim_fields() -> dict[str, type]:
    hints = typing.get_type_hints(OptimConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(OptimConfig) if hints[f.name] in (int, float)}


def default_space(recipe: Recipe) -> list[Dimension]:
    """The method's declared tuning ranges, then optim.lr and optim.weight_decay."""
    method = recipe.method["name"]
    dims = [Dimension(f"method.{name}", declared.tune[0], declared.tune[1], declared.log, tp is int)
            for name, (tp, declared) in _method_fields(method).items() if declared is not None and declared.tune]
    lr = recipe.optim.lr
    dims.append(Dimension("optim.lr", lr / LR_DECADES, lr * LR_DECADES, log=True))
    dims.append(Dimension("optim.weight_decay", *WEIGHT_DECAY_RANGE, log=True))
    return dims


def read_space(path: Path, recipe: Recipe) -> list[Dimension]:
    """The space a --space file gives, every key and range checked against the study's method."""
    where = f"--space {path}"
    if not Path(path).is_file():
        raise UserError(f"{where}: no such file; give a YAML file of recipe keys and ranges (README: Tuning)")
    raw = read_yaml(Path(path))
    if not raw:
        raise UserError(f"{where} names no key to search; give e.g. 'optim.lr: {{low: 0.01, high: 0.5, log: true}}'")
    method = recipe.method["name"]
    fields = _method_fields(method)
    optim = _optim_fields()
    known = [f"method.{name}" for name in fields] + [f"optim.{name}" for name in optim]
    dims = []
    for key, value in raw.items():
        key = str(key)
        section, _, name = key.partition(".")
        if key not in known:
            raise UserError(f"{where}: {_unknown(key, section, name, method, known)}")
        tp, declared = fields[name] if section == "method" else (optim[name], None)
        dims.append(_dimension(where, key, value, tp, declared))
    return dims


def _unknown(key: str, section: str, name: str, method: str, known: list[str]) -> str:
    if section == "method":
        owners = [other for other in METHODS.names() if other != method and name in _method_fields(other)]
        if owners:
            return (f"'{key}' is a parameter of {', '.join(owners)}, not of {method} (the study's method); "
                    f"{method}'s: {', '.join(k for k in known if k.startswith('method.')) or 'none'}")
    return f"unknown key '{key}'{did_you_mean(key, known)}; keys: method.<{method}'s parameters> or optim.<numeric key>"


def _dimension(where: str, key: str, value: Any, tp, declared: Optional[Declared]) -> Dimension:
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"low", "high", "log", "choices"})
        if unknown:
            raise UserError(f"{where}: {key} has unknown field '{unknown[0]}'{did_you_mean(unknown[0], ['low', 'high', 'log', 'choices'])}; "
                            "a range is {low: L, high: H, log: true|false} or [L, H], choices are {choices: [...]}")
        if "choices" in value:
            choices = value["choices"]
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{where}: {key}'s choices must be a non-empty list")
            for choice in choices:
                _check_value(where, key, choice, declared)
            return Dimension(key, choices=tuple(choices))
        low, high, log = value.get("low"), value.get("high"), value.get("log", False)
        if not isinstance(log, bool):
            raise UserError(f"{where}: {key}'s log must be true or false, got {log!r}")
    elif isinstance(value, list):
        if len(value) != 2:
            raise UserError(f"{where}: {key}'s range must be [low, high], got {len(value)} values")
        (low, high), log = value, False
    else:
        _check_value(where, key, value, declared)
        return Dimension(key, fixed=value)
    for end in (low, high):
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not math.isfinite(end):
            raise UserError(f"{where}: {key}'s range needs two finite numbers (low, high), got [{low}, {high}]")
    if tp not in (int, float):
        raise UserError(f"{where}: {key} is not numeric; give {{choices: [...]}} or a fixed value")
    if low == high:
        raise UserError(f"{where}: {key}'s range [{low}, {high}] is empty; give low < high, or a single value to "
                        "fix the key")
    if low > high:
        raise UserError(f"{where}: {key}'s range [{low}, {high}] is inverted; give it as [{high}, {low}]")
    if log and low <= 0:
        raise UserError(f"{where}: {key}'s log-scale range must be positive, got [{low}, {high}]")
    for end in (low, high):
        _check_value(where, key, end, declared)
    integer = tp is int
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise UserError(f"{where}: {key} is an integer; give integer ends, got [{low}, {high}]")
    return Dimension(key, low, high, log, integer)


def _check_value(where: str, key: str, value: Any, declared: Optional[Declared]) -> None:
    if declared is not None and not declared.holds(value):
        raise UserError(f"{where}: {key} must {declared.requirement()}, got {value}")


def space_of(recipe: Recipe, path: Optional[Path]) -> list[Dimension]:
    """The study's space: the --space file's, else the default one. Nothing to search is an error."""
    dims = read_space(path, recipe) if path is not None else default_space(recipe)
    if not any(d.low is not None or d.choices is not None for d in dims):
        raise UserError(f"{'--space ' + str(path) if path else 'the default space'} searches nothing (every key is "
                        "fixed); give at least one range")
    return dims


def overrides_of(params: dict[str, Any]) -> dict:
    """{'method.w_div': 0.5, 'optim.lr': 0.1} -> {'method': {'w_div': 0.5}, 'optim': {'lr': 0.1}}."""
    nested: dict = {}
    for key, value in params.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return nested


def apply(recipe: Recipe, params: dict[str, Any]) -> dict:
    """The recipe (as a dict) with a trial's parameters over it."""
    return deep_merge(recipe.to_dict(), overrides_of(params))
