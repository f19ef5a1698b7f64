"""Data sets (registered by name) and the device-resident batch pipeline."""

from __future__ import annotations

import dataclasses

from ..config import OTHER_KEYS, DataConfig, build_dataclass
from ..errors import UserError, did_you_mean
from ..params import check_declared
from ..registry import import_submodules
from .base import (DATASETS, Augment, Batch, DataSet, ImageData, Loader, RandomBatches, TensorLoader, eval_batches,
                   register_dataset)

from .classes import select_classes
from .noise import apply_label_noise

# each module but these registers its data sets
import_submodules(__name__, __path__, skip=("base", "classes", "decode", "file_loader", "folders", "noise", "samplers",
                                          "transforms"))


# keys every data: section held before each data set declared its own (config.yaml of older runs, recipes): a
# data set that does not take one ignores it, as it always did
FORMER_SHARED_KEYS = ("num_workers", "image_size", "val_fraction")


def dataset_params(cfg: DataConfig):
    """The data set's own parameters (its Params) from `cfg.params`, every key, type and bound checked; a key
    neither shared nor the data set's own is an unknown recipe key."""
    factory = DATASETS.get(cfg.name)
    own = [item.name for item in dataclasses.fields(factory.Params)]
    shared = [item.name for item in dataclasses.fields(DataConfig) if not item.metadata.get(OTHER_KEYS)]
    values = {key: value for key, value in cfg.params.items() if key in own or key not in FORMER_SHARED_KEYS}
    for key in values:
        if key not in own:
            raise UserError(f"unknown recipe key 'data.{key}'{did_you_mean(key, shared + own)}; known keys of data: "
                            f"{', '.join(shared)}; data set '{cfg.name}' adds {', '.join(own) or 'none'}")
    params = build_dataclass(factory.Params, values, where="data")
    check_declared(params, "data")
    return params


def resolved_data_params(cfg: DataConfig) -> dict:
    """The data set's parameters with their defaults filled in, values checked: what config.yaml records."""
    return dataclasses.asdict(dataset_params(cfg))


def build_data(cfg: DataConfig) -> DataSet:
    """The data set named in the recipe, its training split derived in this order (each step seeded by its
    own seed, so the result is the same in every run, resume and command that reads the run):
    0. `data.classes`: only the chosen classes, relabelled in their order (data/classes.py);
    1. `data.val_split`: a class-balanced validation split held out of the whole training set;
    2. `data.train_subset`: a class-balanced subset of what remains (a subset keeps its size with a val split);
    3. `data.label_noise`: noisy labels on that training split only (validation and test labels stay clean);
    4. `data.test_subset`: a fixed, class-balanced part of the test set (one draw for every run and seed).
    `data.origin` records steps 1, 3 and 4 (the run folder's splits.json)."""
    data = DATASETS.get(cfg.name)(cfg, dataset_params(cfg))
    if cfg.classes is not None:  # first: every later step sees only the chosen classes, renumbered
        data = select_classes(data, cfg.classes)
    if cfg.val_split is not None:
        data = data.hold_out_validation(cfg.val_split, cfg.val_seed)
    if cfg.train_subset is not None:
        data = data.subset(cfg.train_subset, cfg.subset_seed)
    noise = cfg.label_noise
    if noise.rate > 0:
        data = apply_label_noise(data, noise.rate, noise.kind, noise.seed)
    if cfg.test_subset is not None:
        data = data.test_part(cfg.test_subset)
    return data


def describe_splits(data) -> list[str]:
    """One line for each derivation of `build_data` that changes what a run trains or is tested on (from
    `data.origin`, as splits.json records it)."""
    origin, lines = data.origin, []
    noise = origin.get("label_noise")
    if noise:
        lines.append(f"label noise: {noise['flipped']} of {noise['train_images']} training labels flipped "
                     f"({100 * noise['applied_rate']:.2f} %, {noise['kind']}, seed {noise['seed']})")
    if "val_split" in origin:
        lines.append(f"validation split: {data.num_val} training images held out (seed "
                     f"{origin['val_split']['seed']}); it chooses the best epoch")
    if "test_subset" in origin:
        lines.append(f"test subset: {data.num_test} test images, class-balanced, the same for every run and seed")
    return lines


__all__ = ["DATASETS", "Augment", "Batch", "DataSet", "ImageData", "Loader", "RandomBatches", "TensorLoader", "build_data",
           "dataset_params", "describe_splits", "eval_batches", "register_dataset", "resolved_data_params"]
