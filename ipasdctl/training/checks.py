"""Checks of a recipe and its data before anything trains: each failure is one UserError line."""

from __future__ import annotations

import math

from ..config import Recipe
from ..data.noise import check_label_noise
from ..errors import UserError
from ..methods import resolved_method_config
from ..runs import RunFolder
from .tracking import check_track


def check_recipe(recipe: Recipe) -> None:
    """Value checks the types cannot express; also fills in (and checks) the method's parameters."""
    recipe.method = resolved_method_config(recipe.method)
    t, o = recipe.train, recipe.optim
    if t.epochs <= 0:
        raise UserError(f"epochs must be a positive integer, got {t.epochs}; use --epochs N with N >= 1")
    if t.batch_size <= 0:
        raise UserError(f"batch size must be a positive integer, got {t.batch_size}; use --batch-size N with N >= 1")
    if t.eval_batch_size <= 0:
        raise UserError(f"train.eval_batch_size must be positive, got {t.eval_batch_size}")
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
    check_label_noise(d.label_noise.rate, d.label_noise.kind)


def check_labels(data, name: str) -> None:
    """Every label must name a class: a label outside 0..K-1 means corrupt files or mismatched class names.
    And the test split must not be empty: a run is judged (best.pt, summary.json) on it."""
    if data.num_test == 0:
        raise UserError(f"data set '{name}' has no test images (its test split is empty: the CIFAR test file, or the "
                        "class folders of val/); a run is judged on its test split: point --data at complete data")
    k = data.num_classes
    for split, labels in (("training", data.train_labels), ("test", data.test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise UserError(f"data set '{name}' has {split} labels from {int(labels.min())} to {int(labels.max())} but "
                            f"{k} classes; its files are corrupt or do not belong together: download it again")


def check_folder_still_there(folder: RunFolder) -> None:
    """Before the trainer writes into its run folder: the folder must still hold its config.yaml and its lock.
    One deleted (or moved) while the run trains is never recreated in part (checkpoints and metrics.csv
    without config.yaml or lock, which `eval` calls no run folder and `--resume` finished)."""
    if not (folder.config.is_file() and folder.lock().path.is_file()):
        raise UserError(f"run folder {folder.path} vanished while the run trained (its config.yaml or .lock is gone); "
                        "the run stopped without writing into it again: train again, or put the folder back and "
                        f"resume it (ipasdctl train --resume {folder.path})")
