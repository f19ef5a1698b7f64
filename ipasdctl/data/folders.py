"""Image folders: finding the images of a `root/<class>/**/<image>` tree, labelling them by their class folder,
and the seeded, stratified split of a folder that has no held-out split of its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, symlinks followed), as sorted paths relative to it; a symlink
    that leads back to a folder on its own path (a loop) is a UserError, not a scan without end."""
    found = []
    root = os.path.realpath(folder)
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        rel = os.path.relpath(directory, folder)
        parts = [] if rel == "." else rel.split(os.sep)
        on_path = {os.path.realpath(os.path.join(folder, *parts[:i])) for i in range(len(parts) + 1)}
        for sub in subdirs:
            target = os.path.realpath(os.path.join(directory, sub))
            if target in on_path or root.startswith(target.rstrip(os.sep) + os.sep):
                raise UserError(f"{os.path.join(directory, sub)} is a symlink back to {target}, a folder on its "
                                "own path: the image folder loops; remove the link")
        for name in sorted(names):
            if is_image_file(name):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def scan_image_folder(folder: Path, class_names: Optional[Sequence[str]] = None
                      ) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """(class names, relative paths, labels) of a `folder/<class>/**/<image>` tree.

    Without `class_names` the sorted class folders define the classes, and each must hold images. With them
    (a val/ split labelled by train/'s classes) every class folder present must be one of them; a class may
    have no images there.
    """
    present = class_folders(folder)
    if not present:
        loose = [name for name in os.listdir(folder) if is_image_file(name)]
        what = f"holds {len(loose)} images but no class folders" if loose else "has no class folders"
        raise UserError(f"{folder} {what}; expected the ImageFolder layout {folder}/<class>/<image files>")
    defining = class_names is None
    if defining:
        class_names = present
    else:
        known = set(class_names)
        unknown = [c for c in present if c not in known]
        if unknown:
            raise UserError(f"{folder} has class folders that the training split lacks: {', '.join(unknown[:5])}"
                            f"{' ...' if len(unknown) > 5 else ''}; both splits must use the same classes")
    label_of = {c: i for i, c in enumerate(class_names)}
    files, labels = [], []
    for name in present:
        images = list_images(folder / name)
        if not images and defining:
            raise UserError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it or add its images")
        files += [os.path.join(name, image) for image in images]
        labels += [label_of[name]] * len(images)
    return list(class_names), as_file_array(files), torch.tensor(labels, dtype=torch.long)


def as_file_array(files: Sequence[str]) -> np.ndarray:
    return np.array([f.encode() for f in files], dtype=bytes) if files else np.zeros(0, dtype="S1")


def stratified_split(labels: torch.Tensor, num_classes: int, fraction: float, seed: int) -> torch.Tensor:
    """A boolean mask of held-out samples: round(fraction * n_c) of each class, by a seeded permutation.

    A class keeps at least one training sample.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        count = min(int(round(idx.numel() * fraction)), max(idx.numel() - 1, 0))
        held_out[idx[:count]] = True
    return held_out
