"""Starting from trained weights: `model.weights`, `model.freeze_epochs`, `optim.backbone_lr_scale`.

- The weights (runs/weights.py reads the spec) are read before the data set is built, because their own
  preprocessing is the default: an image-file data set without `data.image_size` takes the weights' input size,
  and every data set normalises with the weights' mean/std when they carry them (ImageNet weights, a run
  folder's data), so the checkpoint's data_stats, the export's metadata and `predict` follow them.
- The head is the model's `classifier` plus the method's training-only modules (new, randomly initialised);
  everything else is the backbone. `backbone_lr_scale` multiplies the backbone's lr (each optimizer group carries
  its `lr_scale`); for the first `freeze_epochs` epochs the backbone's parameters take no gradient (their
  BatchNorm statistics still follow the new data: the layers stay in training mode).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from torch import nn

from ..config import DataConfig, ResolvedRecipe
from ..errors import UserError
from ..models.weights import LoadedWeights
from ..runs.weights import WeightsSource, fit_source, read_source


def read_initial_weights(recipe: ResolvedRecipe) -> Optional[WeightsSource]:
    """The tensors `model.weights` names (None without it)."""
    spec = recipe.model.weights
    return read_source(spec, recipe.model.arch) if spec else None


def data_config_for(cfg: DataConfig, source: Optional[WeightsSource]) -> DataConfig:
    """The data section with the weights' input size where the data set takes one and the recipe sets none."""
    if source is None or source.input_size is None or "image_size" not in cfg.params or cfg.params["image_size"]:
        return cfg
    return replace(cfg, params={**cfg.params, "image_size": int(source.input_size)})


def with_weights_preprocessing(data, source: Optional[WeightsSource]):
    """The data set normalised with the weights' mean/std, when they carry them for its channel count."""
    if source is None or not source.mean or not source.std or len(source.mean) != data.image_shape[0]:
        return data
    return replace(data, mean=list(source.mean), std=list(source.std))


def fit_initial_weights(model: nn.Module, source: Optional[WeightsSource], arch: str,
                        note=None) -> Optional[LoadedWeights]:
    """Load the weights into `model` (in place), say what was loaded once, and return it (summary.json's)."""
    if source is None:
        return None
    loaded = fit_source(model, source, arch)
    if note is not None:
        note(loaded.describe())
    return loaded


def head_parameters(model: nn.Module, extra: Optional[nn.Module]) -> list[nn.Parameter]:
    """The parameters trained from scratch: the classifier and the method's training-only modules."""
    params = list(model.classifier.parameters())
    return params + (list(extra.parameters()) if extra is not None else [])


def optimizer_groups(net: nn.Module, model: nn.Module, extra: Optional[nn.Module], backbone_lr_scale: float) -> list:
    """The optimizer's parameter groups: one group (lr_scale 1) unless the backbone's lr is scaled."""
    if backbone_lr_scale == 1.0:
        return [{"params": list(net.parameters()), "lr_scale": 1.0}]
    head = {id(p) for p in head_parameters(model, extra)}
    backbone = [p for p in net.parameters() if id(p) not in head]
    return [{"params": backbone, "lr_scale": float(backbone_lr_scale)},
            {"params": [p for p in net.parameters() if id(p) in head], "lr_scale": 1.0}]


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """The backbone's parameters take gradients or not (the classifier always does)."""
    head = {id(p) for p in model.classifier.parameters()}
    for param in model.parameters():
        if id(param) not in head:
            param.requires_grad_(not frozen)


def check_freezing(recipe: ResolvedRecipe, several_processes: bool) -> None:
    if recipe.model.freeze_epochs and several_processes:
        raise UserError("model.freeze_epochs works in one process (DistributedDataParallel fixes the trained "
                        "parameters when it starts); train without --nproc, or set model.freeze_epochs=0")
