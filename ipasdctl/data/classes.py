"""`data.classes`: a subset of a data set's classes, by name or index, in the given order.

The chosen classes are renumbered 0..k-1 in that order (so `[cat, dog]` and `[dog, cat]` are two labelings of one
task), and every split keeps only their images. One data set then gives a source task and a target task (CIFAR-10's
first five classes, then the other five), which is how a fine-tuning experiment is set up without a second data set.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence, Union

import torch

from ..errors import UserError, did_you_mean

# the per-split fields a data set keeps per sample, beside its labels (tensor data sets, file data sets)
SAMPLE_FIELDS = {"train": ("train_images", "train_files"), "test": ("test_images", "test_files"),
                 "val": ("val_images", "val_files")}


def class_indices(chosen: Sequence[Union[str, int]], class_names: Sequence[str]) -> list[int]:
    """The data set's index of each chosen class (a name, or an index into class_names); a UserError otherwise."""
    names = [str(name) for name in class_names]
    indices = []
    for item in chosen:
        if isinstance(item, int):
            if not 0 <= item < len(names):
                raise UserError(f"data.classes: index {item} is out of range; this data set has {len(names)} classes "
                                f"(0..{len(names) - 1})")
            indices.append(item)
        elif item in names:
            indices.append(names.index(item))
        else:
            raise UserError(f"data.classes: no class '{item}'{did_you_mean(item, names)}; classes: "
                            f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    if len(set(indices)) != len(indices):
        raise UserError(f"data.classes names a class twice ({list(chosen)}); name each class once")
    if len(indices) < 2:
        raise UserError("data.classes must name at least 2 classes: a classifier needs two")
    return indices


def select_classes(data, chosen: Sequence[Union[str, int]]):
    """The data set restricted to the chosen classes, relabelled 0..k-1 in their order."""
    indices = class_indices(chosen, data.class_names)
    relabel = torch.full((len(data.class_names),), -1, dtype=torch.long)
    relabel[torch.tensor(indices)] = torch.arange(len(indices))
    changes: dict = {"class_names": [data.class_names[i] for i in indices]}
    for split, fields in SAMPLE_FIELDS.items():
        labels = getattr(data, f"{split}_labels", None)
        if labels is None:
            continue
        keep = relabel[labels.long()] >= 0
        changes[f"{split}_labels"] = relabel[labels.long()][keep].to(labels.dtype)
        for name in fields:
            samples = getattr(data, name, None)
            if samples is not None:
                changes[name] = samples[keep] if isinstance(samples, torch.Tensor) else samples[keep.numpy()]
    if not int(changes["train_labels"].numel()):
        raise UserError(f"data.classes={list(chosen)} leaves no training image")
    return replace(data, **changes, origin={**data.origin, "classes": [str(n) for n in changes["class_names"]]})
