"""Recipes: code defaults < YAML recipe < command-line options < --set key=value.

A recipe is plain nested YAML with the sections below. The fully resolved recipe is saved as
`config.yaml` in every run folder, so a run can be repeated from its folder alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError, did_you_mean
from .yaml_files import MalformedYaml, load_yaml, read_yaml_file

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_METHOD = "ipasd"  # the method of a recipe that names none
MAX_RECIPE_BYTES = 1_000_000  # a recipe is a page of YAML; a bigger file is not one
INT_BOUND = 2**63  # every integer of a recipe fits a 64-bit signed integer (a tensor, a seed, a count)

OTHER_KEYS = "ipasdctl.other_keys"  # field metadata: the field collects the section's keys no other field names

_short = reprlib.Repr()  # values in messages: bounded in length and depth, so a YAML alias bomb prints quickly
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 60, 60, 2, 4, 4


def shown(value: Any) -> str:
    """repr(value), at most a line: safe for any value a file or option brings (nested, shared, huge)."""
    return _short.repr(value)


@dataclass
class LabelNoiseConfig:
    """Noisy training labels (test and validation labels stay clean): exactly round(rate * N) labels flipped."""

    rate: float = 0.0  # the fraction of training labels flipped (0: none)
    kind: str = "symmetric"  # symmetric: to one of the other classes, uniformly | pairflip: class c to c + 1 mod K
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None  # folder holding the data set's files (cifar-10-batches-py/, ...)
    train_subset: Optional[int] = None  # fixed, seeded, class-balanced subset of the training set
    subset_seed: int = 0
    augment: bool = True
    # a class-balanced validation split of N training images (held out before train_subset draws), with its own
    # seed: it chooses the best epoch (best.pt) and fits `ipasdctl calibrate`'s temperature; test stays reported
    val_split: Optional[int] = None
    val_seed: int = 0
    # a fixed, class-balanced part of N test images (seeded by the constant data.base.TEST_SUBSET_SEED, not by
    # the run's seed: every run and method of a comparison is tested on the same images, so it stays paired)
    test_subset: Optional[int] = None
    label_noise: LabelNoiseConfig = field(default_factory=LabelNoiseConfig)
    # a subset of the data set's classes, by name or index, in this order (renumbered 0..k-1); None: all of them
    classes: Optional[list] = None
    # the data set's own parameters (image_size, num_workers, ...), declared by the data set as a method declares
    # its own (data/base.py): flat beside the keys above in a recipe's data: section and in config.yaml
    params: dict = field(default_factory=dict, metadata={OTHER_KEYS: True})


@dataclass
class PruningRecord:
    """What `ipasdctl prune` made this run from (compress/prune.py): a record that every table reads, not a knob
    of training. The shapes themselves are `model.structure`."""

    source: str = ""  # the unpruned run folder
    checkpoint: str = "best"  # its checkpoint that was pruned
    target_macs: Optional[float] = None  # the fraction of the source's MACs aimed at, or
    target_latency_ms: Optional[float] = None  # the batch-1 latency aimed at (onnxruntime, this CPU)
    importance: str = "magnitude"  # magnitude | taylor | bn-scale
    steps: int = 1  # prune a share, recover, repeat: this many times
    step: int = 1  # which of them this run is
    round_to: int = 1  # every pruned layer kept a multiple of this many channels


@dataclass
class ModelConfig:
    arch: str = "resnet8"
    # initial weights (runs/weights.py): a .safetensors / .pt file, a run folder (RUN, RUN:last),
    # torchvision[:ENUM] for tv_* archs, timm[:TAG] for timm:<name> ones; None: random init
    weights: Optional[str] = None
    freeze_epochs: int = 0  # train the classifier (and a method's new heads) alone for this many first epochs
    # a pruned network's shapes as data (models/structure.py): module name -> its type and channel counts, applied
    # to the architecture as built; None: the architecture as registered
    structure: Optional[dict] = None
    pruning: Optional[PruningRecord] = None  # set by `ipasdctl prune`


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0  # lr rises linearly per step over these epochs
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [100, 150])  # epochs counted after warm-up
    gamma: float = 0.1
    backbone_lr_scale: float = 1.0  # the backbone's lr relative to the classifier's (fine-tuning: e.g. 0.1)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    eval_batch_size: int = 512
    eval_every: int = 1  # epochs between test (and validation) passes; the last epoch is always evaluated
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # NHWC model and batches, on CUDA and CPU alike
    compile: bool = False
    detect_anomaly: bool = False
    deterministic: bool = False  # CUDA: deterministic kernels, no cuDNN autotuning (exact resume; slower)
    sync_bn: bool = False  # several processes on CUDA: BatchNorm statistics over the global batch (--sync-bn)
    track: Optional[str] = None  # experiment tracking: tensorboard or mlflow (--track; training/tracking.py)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N steps inside an epoch (0: only at epoch ends)


@dataclass
class Recipe:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # method: {"name": ..., **the method's own parameters}; checked against the method's Params
    method: dict = field(default_factory=lambda: {"name": DEFAULT_METHOD})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if isinstance(self.method, dict) and "name" not in self.method:
            self.method = {"name": DEFAULT_METHOD, **self.method}

    def to_dict(self) -> dict:
        """The recipe as plain nested data (what config.yaml holds)."""
        return plain_dict(self)


@dataclass
class ResolvedRecipe(Recipe):
    """A recipe with the method's and the data set's parameters filled in at their defaults and every value
    checked: what `training.resolve_recipe` returns at each entry point (API, CLI, compare's plan), what
    training reads (and never changes) and what config.yaml records. Change a copy, then resolve it again."""


def plain_dict(obj) -> dict:
    """dataclasses.asdict, but a field marked OTHER_KEYS is spread into its parent (data.params: flat keys)."""
    out: dict = {}
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        value = plain_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
        if item.metadata.get(OTHER_KEYS):
            out.update(value)
        else:
            out[item.name] = value
    return out


# ---------------------------------------------------------------- typed construction from plain dicts


def coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Errors name the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {shown(value)}")
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {shown(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_BOUND <= value < INT_BOUND:
                raise UserError(f"{where} must be an integer from -2^63 to 2^63-1, got {shown(value)}")
            return value
        raise UserError(f"{where} must be an integer, got {shown(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (abs(value) < 1e300 and math.isfinite(value)):  # .nan, .inf, 2^1100
                raise UserError(f"{where} must be a finite number, got {shown(value)}")
            return float(value)
        raise UserError(f"{where} must be a number, got {shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where} must be a string, got {shown(value)}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    return value


def build_dataclass(cls, values: Any, where: str = ""):
    """cls(**values) with every key and type checked; unknown keys suggest the closest known one."""
    if values is None:
        values = {}
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise UserError(f"{where or 'recipe'} must be a mapping of keys to values, got {shown(values)}")
    hints = typing.get_type_hints(cls)
    other = next((f.name for f in dataclasses.fields(cls) if f.metadata.get(OTHER_KEYS)), None)
    names = [f.name for f in dataclasses.fields(cls) if f.name != other]
    kwargs: dict = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else str(key)
        if other is not None and key not in names:  # checked later by whoever declares them (the data set)
            kwargs.setdefault(other, {})[key] = value
            continue
        if key not in names:
            raise UserError(
                f"unknown recipe key '{full}'{did_you_mean(key, names)}; "
                f"known keys{' of ' + where if where else ''}: {', '.join(names)}"
            )
        kwargs[key] = coerce(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------- loading, overriding, saving


def resolve_recipe_path(recipe: str) -> Path:
    """A path, or the name of a file in recipes/ (with or without .yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise UserError(
        f"recipe '{recipe}' not found: not a file, nor a name in {RECIPES_DIR}"
        f"{did_you_mean(Path(recipe).stem, known)}; known recipes: {', '.join(known)}"
    )


def read_yaml(path: Path) -> dict:
    data = read_yaml_file(path, f"recipe {path}", max_bytes=MAX_RECIPE_BYTES)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (data:, model:, method:, ...)")
    return data


def parse_set(assignments: list[str]) -> dict:
    """['train.epochs=3', 'method.con_grad=false'] -> nested dict, values parsed as YAML scalars."""
    nested: dict = {}
    for item in assignments or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value (e.g. train.epochs=3), got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"--set key '{key}' is not a dotted recipe key (e.g. optim.lr)")
        try:
            value = load_yaml(raw, f"--set {key}") if raw.strip() else None
        except MalformedYaml:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(recipe: Optional[str] = None, overrides: Optional[dict] = None) -> Recipe:
    """Defaults < recipe file < overrides (already nested). Validates every key and type."""
    raw: dict = {}
    if recipe:
        raw = read_yaml(resolve_recipe_path(recipe))
    if overrides:
        raw = deep_merge(raw, overrides)
    if isinstance(raw.get("method"), str):  # method: cs-kd, short for method: {name: cs-kd}
        raw["method"] = {"name": raw["method"]}
    return build_dataclass(Recipe, raw)  # a method without a name is the default one (Recipe.__post_init__)


def recipe_from_dict(values: dict) -> Recipe:
    return build_dataclass(Recipe, values)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def differing_keys(a, b, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (in a's order, then b's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for key in list(dict.fromkeys([*a, *b])):
            keys += differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]
