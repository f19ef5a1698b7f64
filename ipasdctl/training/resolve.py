"""A recipe resolved once: each entry point (the API, the CLI, compare's plan, a recipe read from a run folder)
turns its Recipe into a ResolvedRecipe (defaults filled in, every value checked); everything after it only
reads that value. Nothing here changes its argument."""

from __future__ import annotations

import copy
import dataclasses
import math

from ..config import Recipe, ResolvedRecipe, recipe_from_dict
from ..data import resolved_data_params
from ..data.noise import check_label_noise
from ..errors import UserError
from ..methods import resolved_method_config
from .tracking import check_track


def resolve_recipe(recipe: Recipe) -> ResolvedRecipe:
    """A copy of `recipe` with the method's and the data set's parameters filled in at their defaults (what
    config.yaml records), every value checked: a UserError for the first that is wrong."""
    sections = {item.name: copy.deepcopy(getattr(recipe, item.name)) for item in dataclasses.fields(Recipe)}
    sections["method"] = resolved_method_config(recipe.method)
    sections["data"].params = resolved_data_params(recipe.data)
    resolved = ResolvedRecipe(**sections)
    check_values(resolved)
    return resolved


def resolved(recipe: Recipe) -> ResolvedRecipe:
    """`recipe` itself when it is resolved already, else resolve_recipe(recipe): for the training functions,
    which the API and the CLI hand a resolved recipe and a Python caller may hand a plain one."""
    return recipe if isinstance(recipe, ResolvedRecipe) else resolve_recipe(recipe)


def resolved_dict(values: dict) -> dict:
    """A recipe read from a file (config.yaml, a checkpoint, comparison.yaml) as its resolved dict: keys added
    since it was written at their defaults, keys since dropped gone, so only real differences differ. As it is
    when it is no valid recipe (the comparison then reports what differs)."""
    try:
        return resolve_recipe(recipe_from_dict(values)).to_dict()
    except UserError:
        return values


def check_values(recipe: Recipe) -> None:
    """Value checks the types cannot express (the method's and the data set's parameters check their own)."""
    t, o = recipe.train, recipe.optim
    if t.epochs <= 0:
        raise UserError(f"epochs must be a positive integer, got {t.epochs}; use --epochs N with N >= 1")
    if t.batch_size <= 0:
        raise UserError(f"batch size must be a positive integer, got {t.batch_size}; use --batch-size N with N >= 1")
    if t.eval_batch_size <= 0:
        raise UserError(f"train.eval_batch_size must be positive, got {t.eval_batch_size}")
    if t.eval_every <= 0:
        raise UserError(f"train.eval_every must be a positive number of epochs, got {t.eval_every}; 1 evaluates after "
                        "every epoch (the last epoch is always evaluated)")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise UserError(f"learning rate must be a positive number, got {o.lr}; e.g. --lr 0.1")
    d = recipe.data
    for key, seed in (("seed", t.seed), ("data.val_seed", d.val_seed), ("data.label_noise.seed", d.label_noise.seed)):
        if not 0 <= seed < 2**63:
            raise UserError(f"{key} must be an integer from 0 to 2^63-1, got {seed}")
    if recipe.checkpoint.every_steps < 0:
        raise UserError(f"checkpoint.every_steps must be 0 (epoch ends only) or positive, got {recipe.checkpoint.every_steps}")
    if o.schedule not in ("multistep", "cosine", "constant"):
        raise UserError(f"optim.schedule must be multistep, cosine or constant, got '{o.schedule}'")
    if o.warmup_epochs < 0 or o.weight_decay < 0 or o.momentum < 0:
        raise UserError("optim.warmup_epochs, weight_decay and momentum must not be negative")
    check_track(t.track)
    if d.val_split is not None and d.val_split <= 0:
        raise UserError(f"data.val_split must be a positive number of training images, got {d.val_split}; "
                        "leave it unset for no validation split")
    if d.test_subset is not None and d.test_subset <= 0:
        raise UserError(f"data.test_subset must be a positive number of test images, got {d.test_subset}; leave it "
                        "unset to test on the whole test set")
    check_label_noise(d.label_noise.rate, d.label_noise.kind)
    check_finetuning(recipe)


def check_finetuning(recipe: Recipe) -> None:
    m, o, d = recipe.model, recipe.optim, recipe.data
    if not (0 <= o.backbone_lr_scale <= 1e6 and math.isfinite(o.backbone_lr_scale)):
        raise UserError(f"optim.backbone_lr_scale must be a number from 0 to 1e6 (the backbone's lr relative to the "
                        f"classifier's), got {o.backbone_lr_scale}")
    if not 0 <= m.freeze_epochs < recipe.train.epochs:
        raise UserError(f"model.freeze_epochs must be from 0 to epochs - 1 ({recipe.train.epochs - 1}), got "
                        f"{m.freeze_epochs}")
    if m.weights is not None and not m.weights.strip():
        raise UserError("model.weights is empty; give a weights file, a run folder, or torchvision[:ENUM] / "
                        "timm[:TAG] (leave it unset for random weights)")
    if d.classes is not None:
        if not isinstance(d.classes, list) or not d.classes or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in d.classes):
            raise UserError(f"data.classes must be a non-empty list of class names or indices, got {d.classes!r:.80}")
        if len(set(d.classes)) != len(d.classes):
            raise UserError(f"data.classes names a class twice: {d.classes!r:.80}")
