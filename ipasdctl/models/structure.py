"""A pruned network's shapes as data (`model.structure` of a recipe), so a checkpoint of it stays weights-only.

    {"stages.0.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 11, "groups": 1},
     "stages.0.0.bn1": {"type": "BatchNorm2d", "num_features": 11}, ...}

Each entry names a module of the architecture as registered whose channel counts differ from it, by the type
and the attributes that fix its tensors' shapes (SHAPE_ATTRIBUTES). `apply_structure` builds those modules to
the recorded shapes (fresh parameters, initialised by the module's own reset_parameters) before any weights
are loaded, and derives what the contract says of the network (`embed_dim`, `stage_channels`) from the
result: so `build_model(arch, classes, structure)` gives the pruned net to training and to every reader alike.
`describe_structure` writes the entries from a pruned network; a layer whose shapes changed but whose type is
not one of these cannot be written as data and is refused, by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import UserError

SHAPE_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm1d: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
}
MAX_CHANNELS = 1 << 20


def _kind(module: nn.Module) -> Optional[type]:
    """The entry of SHAPE_ATTRIBUTES a module is built as (a subclass, e.g. timm's padded Conv2d, counts)."""
    return next((kind for kind in SHAPE_ATTRIBUTES if isinstance(module, kind)), None)


def _shapes(module: nn.Module) -> dict[str, tuple]:
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return {name: tuple(t.shape) for name, t in own if t is not None}


def _attributes(module: nn.Module, kind: type) -> dict:
    values = {name: getattr(module, name) for name in SHAPE_ATTRIBUTES[kind]}
    if "normalized_shape" in values:
        values["normalized_shape"] = [int(v) for v in values["normalized_shape"]]
    return values


def describe_structure(pruned: nn.Module, reference: nn.Module) -> dict:
    """The entries of every module of `pruned` whose shapes differ from the same module of `reference` (the
    architecture as registered); a UserError naming the first changed layer that cannot be written as data."""
    built = dict(reference.named_modules())
    structure = {}
    for name, module in pruned.named_modules():
        original = built.get(name)
        if original is None or type(original) is not type(module):
            raise UserError(f"pruning replaced layer '{name}' ({type(module).__name__}); ipasdctl can only record "
                            "pruned channel counts of the architecture's own layers")
        if _shapes(module) == _shapes(original):
            continue
        kind = _kind(module)
        if kind is None:
            raise UserError(f"pruning changed layer '{name}' ({type(module).__name__}), whose shapes ipasdctl cannot "
                            "record as data; this architecture cannot be pruned (supported: "
                            f"{', '.join(k.__name__ for k in SHAPE_ATTRIBUTES)})")
        structure[name] = {"type": kind.__name__, **_attributes(module, kind)}
    return structure


def apply_structure(model: nn.Module, structure: dict, arch: str) -> nn.Module:
    """`model` (the architecture as built) with the recorded modules rebuilt to their shapes, and its
    `embed_dim` and `stage_channels` as the rebuilt network has them; a UserError for an entry that does not
    fit the architecture."""
    if not isinstance(structure, dict):
        raise UserError(f"model.structure must be a mapping of layer names to shapes, got {type(structure).__name__}")
    modules = dict(model.named_modules())
    for name, entry in structure.items():
        module = modules.get(name)
        where = f"model.structure['{name}']"
        if module is None:
            raise UserError(f"{where}: {arch} has no layer '{name}'; was the run pruned from another architecture?")
        kind = _kind(module)
        if kind is None or not isinstance(entry, dict) or entry.get("type") != kind.__name__:
            got = entry.get("type") if isinstance(entry, dict) else entry
            raise UserError(f"{where} records a {got!r:.40}, but the layer of {arch} is a {type(module).__name__}")
        _reshape(module, kind, entry, where)
    _derive_contract(model, arch)
    return model


def _whole(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CHANNELS:
        raise UserError(f"{where}.{key} must be a whole number from 1 to {MAX_CHANNELS}, got {value!r:.40}")
    return value


def _reshape(module: nn.Module, kind: type, entry: dict, where: str) -> None:
    """Set the shape attributes and give the module fresh tensors of those shapes (reset_parameters)."""
    missing = [key for key in SHAPE_ATTRIBUTES[kind] if key not in entry]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}")
    if kind is nn.LayerNorm:
        shape = entry["normalized_shape"]
        if not isinstance(shape, list) or not shape:
            raise UserError(f"{where}.normalized_shape must be a list of sizes, got {shape!r:.40}")
        module.normalized_shape = tuple(_whole(v, where, "normalized_shape") for v in shape)
        if module.elementwise_affine:
            module.weight = nn.Parameter(torch.empty(module.normalized_shape))
            if module.bias is not None:
                module.bias = nn.Parameter(torch.empty(module.normalized_shape))
        module.reset_parameters()
        return
    values = {key: _whole(entry[key], where, key) for key in SHAPE_ATTRIBUTES[kind]}
    for key, value in values.items():
        setattr(module, key, value)
    if kind is nn.Conv2d:
        if module.in_channels % module.groups or module.out_channels % module.groups:
            raise UserError(f"{where}: {module.in_channels} input and {module.out_channels} output channels do not "
                            f"split into {module.groups} groups")
        shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        module.weight = nn.Parameter(torch.empty(shape))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(module.out_channels))
    elif kind is nn.Linear:
        module.weight = nn.Parameter(torch.empty(module.out_features, module.in_features))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(module.out_features))
    elif kind is nn.GroupNorm:
        if module.num_channels % module.num_groups:
            raise UserError(f"{where}: {module.num_channels} channels do not split into {module.num_groups} groups")
        if module.affine:
            module.weight = nn.Parameter(torch.empty(module.num_channels))
            module.bias = nn.Parameter(torch.empty(module.num_channels))
    else:  # BatchNorm
        size = module.num_features
        if module.affine:
            module.weight = nn.Parameter(torch.empty(size))
            module.bias = nn.Parameter(torch.empty(size))
        if module.track_running_stats:
            module.running_mean = torch.zeros(size)
            module.running_var = torch.ones(size)
    module.reset_parameters()


def _derive_contract(model: nn.Module, arch: str) -> None:
    """embed_dim (the classifier's input) and stage_channels (the stages' outputs), from a forward pass on the
    meta device (shapes only: no arithmetic, no memory); a structure whose layers do not fit together fails
    here, in one line, not in the first training step."""
    size = int(getattr(model, "default_input_size", 32))
    tensors = {name: torch.empty_like(t, device="meta") for name, t in
               [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, embedding, stages = torch.func.functional_call(
                model, tensors, (torch.empty(1, 3, size, size, device="meta"),), {"with_features": True})
    except (RuntimeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:160]
        raise UserError(f"model.structure does not describe a working {arch}: its layers do not fit together "
                        f"({first}); was config.yaml edited?") from None
    finally:
        model.train(was_training)
    model.embed_dim = int(embedding.shape[1])
    model.stage_channels = [int(stage.shape[1]) for stage in stages]
