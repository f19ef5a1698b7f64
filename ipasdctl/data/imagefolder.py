"""`imagefolder`: any `root/<class>/<images>` tree (Plant Village is one), decoded in DataLoader workers.

Layout: `root/train/<class>/...` and `root/val/<class>/...` (or `test/`) when both are there; otherwise
`root/<class>/...` with a seeded, stratified split: `data.val_fraction` of each class (default 0.2) is held
out as the test set, the permutation seeded by `data.subset_seed` (not the run's seed, so every run of a
comparison is evaluated on the same images). Classes are the sorted class-folder names; images are found
recursively (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp, any case).

Image size S = `data.image_size` (default 224). Augmentation, by size (data/transforms.py, `transforms_for`):
- S <= 64 (small images, as CIFAR and Tiny ImageNet): resize to S x S; training adds a random S x S crop of
  the image zero-padded by 4 pixels and a horizontal flip; evaluation is the resize alone.
- S > 64 (the ImageNet recipe): training is a random-resized crop (8-100 % of the area, aspect 3/4-4/3) to
  S x S and a flip; evaluation resizes the shorter side to S / 0.875 (256 for 224) and takes the centre crop.
Normalisation: the ImageNet statistics, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (a folder of
photographs has no published statistics of its own; Plant Village papers use these).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..bounds import MAX_IMAGE_SIDE
from ..errors import UserError
from .base import register_dataset
from .file_loader import FileImageData, check_workers
from .folders import scan_image_folder, stratified_split
from .transforms import IMAGENET_MEAN, IMAGENET_STD, transforms_for

DEFAULT_IMAGE_SIZE = 224


@dataclass
class DecodedImageParams:
    """The parameters of a data set decoded from image files (imagenet, tiny-imagenet; imagefolder adds one)."""

    image_size: Optional[int] = None  # resize/crop size, pixels a side (unset: the data set's own)
    num_workers: int = 2  # DataLoader processes that decode (0: in the training process)


@dataclass
class ImageFolderParams(DecodedImageParams):
    val_fraction: float = 0.2  # a folder without a val/ split: the share of each class held out as its *test* set


def check_image_size(size: Optional[int], default: int) -> int:
    size = default if size is None else size
    if not 8 <= size <= MAX_IMAGE_SIDE:
        raise UserError(f"data.image_size must be from 8 to {MAX_IMAGE_SIDE} pixels, got {size}")
    return size


def require_folder(root: Optional[str], dataset: str, layout: str) -> Path:
    if not root:
        raise UserError(f"{dataset} needs --data DIR: the folder that holds {layout}")
    folder = Path(root).expanduser()
    if not folder.exists():
        raise UserError(f"--data {folder} does not exist; point --data at the folder that holds {layout}")
    if not folder.is_dir():
        raise UserError(f"--data {folder} is not a folder; point --data at the folder that holds {layout}")
    return folder


def load_image_folder(root: Optional[str], image_size: Optional[int] = None, val_fraction: float = 0.2,
                      split_seed: int = 0, num_workers: int = 2, name: str = "imagefolder") -> FileImageData:
    folder = require_folder(root, name, "<class>/<images>, or train/<class>/ and val/<class>/")
    size = check_image_size(image_size, DEFAULT_IMAGE_SIZE)
    check_workers(num_workers)  # before the scan: fail fast
    train_transform, eval_transform = transforms_for(size)
    held_out_dir = next((folder / n for n in ("val", "test") if (folder / n).is_dir()), None)
    if (folder / "train").is_dir() and held_out_dir is not None:
        class_names, train_files, train_labels = scan_image_folder(folder / "train")
        _, test_files, test_labels = scan_image_folder(held_out_dir, class_names)
        train_root, test_root = folder / "train", held_out_dir
    else:
        class_names, files, labels = scan_image_folder(folder)
        held_out = stratified_split(labels, len(class_names), val_fraction, split_seed)
        if not bool(held_out.any()):
            raise UserError(f"data.val_fraction={val_fraction} holds out no image of {folder} "
                            f"({labels.numel()} images in {len(class_names)} classes); raise it or add a val/ split")
        keep = (~held_out).numpy()
        train_files, train_labels = files[keep], labels[~held_out]
        test_files, test_labels = files[~keep], labels[held_out]
        train_root = test_root = folder
    if len(class_names) < 2:
        raise UserError(f"{folder} has {len(class_names)} class folder; a classifier needs at least 2")
    return FileImageData(name=name, train_root=str(train_root), train_files=train_files, train_labels=train_labels,
                         test_root=str(test_root), test_files=test_files, test_labels=test_labels,
                         class_names=class_names, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         train_transform=train_transform, eval_transform=eval_transform, image_size=size,
                         num_workers=num_workers)


@register_dataset("imagefolder", ImageFolderParams)
def imagefolder(cfg, params: ImageFolderParams) -> FileImageData:
    return load_image_folder(cfg.root, params.image_size, params.val_fraction, cfg.subset_seed, params.num_workers)
