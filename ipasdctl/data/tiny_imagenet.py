"""`tiny-imagenet`: Tiny ImageNet (200 classes, 100,000 training and 10,000 validation images of 64x64).

Layout (the official `tiny-imagenet-200/`): `wnids.txt` (the 200 class ids, in label order), `words.txt`
(wnid -> names), `train/<wnid>/images/*.JPEG`, `val/images/*.JPEG` labelled by `val/val_annotations.txt`
(file, wnid, box). The validation set is the test set (the official test/ split has no labels). Class folders
and annotations whose wnid is not in wnids.txt are ignored. `--data` is the folder that holds
`tiny-imagenet-200/`, or that folder itself.

Decided: the images are decoded once (in DataLoader worker processes, `data.num_workers`) into uint8 tensors
and then use the tensor-resident pipeline of data/base.py (ImageData): 110,000 images of 64x64 are 1.35 GB,
augmentation runs as batched tensor ops on the training device, there is no per-step decoding, and
methods that need extra augmented views (ddgsd) work. Decoding costs about as much as one epoch of
file-based loading, once per run.
Augmentation as the paper: random 64x64 crop of the image zero-padded by 4 pixels, horizontal flip.
Normalisation: mean (0.4802, 0.4481, 0.3975), std (0.2770, 0.2691, 0.2821). `data.image_size` (default 64)
resizes the images at decoding (e.g. 32 for quick runs); the crop padding stays 4.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from .base import ImageData, register_dataset
from .file_loader import decode_all
from .folders import as_file_array, is_image_file
from .imagefolder import DecodedImageParams, check_image_size

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2770, 0.2691, 0.2821)
FOLDER = "tiny-imagenet-200"
SIZE = 64
PAD = 4
_WHERE = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def find_tiny_imagenet(root: Optional[str]) -> Path:
    if not root:
        raise UserError(f"tiny-imagenet needs --data DIR: the folder that contains {FOLDER}/ (from {_WHERE})")
    base = Path(root).expanduser()
    if not base.exists():
        raise UserError(f"--data {base} does not exist; point --data at the folder that contains {FOLDER}/ "
                        f"(from {_WHERE})")
    for candidate in (base / FOLDER, base):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise UserError(f"{base} does not contain {FOLDER}/ (no wnids.txt found); point --data at the folder "
                    f"holding it (from {_WHERE})")


def read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def class_names_of(folder: Path, wnids: list[str]) -> list[str]:
    """The first name words.txt gives each wnid ('n01443537' -> 'goldfish'); the wnid where it has none."""
    words = {}
    if (folder / "words.txt").is_file():
        for line in read_lines(folder / "words.txt"):
            wnid, _, names = line.partition("\t")
            words[wnid] = names.split(",")[0].strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def scan_train(folder: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise UserError(f"{images_dir} is missing: wnids.txt lists {wnid}; the download may be incomplete")
        names = sorted(name for name in os.listdir(images_dir) if is_image_file(name))
        if not names:
            raise UserError(f"{images_dir} holds no images; the download may be incomplete")
        files += [os.path.join(wnid, "images", name) for name in names]
        labels += [label] * len(names)
    return files, labels


def scan_val(folder: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"{annotations} is missing; expected the official {FOLDER}/ layout")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(read_lines(annotations), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise UserError(f"{annotations} line {number} is not 'file<TAB>wnid<TAB>...': {line[:60]!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in label_of:
            continue
        if not (folder / "val" / "images" / name).is_file():
            raise UserError(f"{folder / 'val' / 'images' / name} is listed in val_annotations.txt but missing")
        files.append(os.path.join("images", name))
        labels.append(label_of[wnid])
    order = sorted(range(len(files)), key=lambda i: files[i])
    return [files[i] for i in order], [labels[i] for i in order]


def load_tiny_imagenet(root: Optional[str], image_size: Optional[int] = None, num_workers: int = 2) -> ImageData:
    folder = find_tiny_imagenet(root)
    size = check_image_size(image_size, SIZE)
    wnids = read_lines(folder / "wnids.txt")
    if len(set(wnids)) != len(wnids) or len(wnids) < 2:
        raise UserError(f"{folder / 'wnids.txt'} must list at least 2 distinct wnids, one per line")
    train_files, train_labels = scan_train(folder, wnids)
    test_files, test_labels = scan_val(folder, wnids)
    train_images = decode_all(str(folder / "train"), as_file_array(train_files), size, num_workers)
    test_images = decode_all(str(folder / "val"), as_file_array(test_files), size, num_workers)
    return ImageData("tiny-imagenet", train_images, torch.tensor(train_labels, dtype=torch.long), test_images,
                     torch.tensor(test_labels, dtype=torch.long), class_names_of(folder, wnids), TINY_MEAN, TINY_STD,
                     pad=PAD, hflip=True)


@register_dataset("tiny-imagenet", DecodedImageParams)
def tiny_imagenet(cfg, params: DecodedImageParams) -> ImageData:
    return load_tiny_imagenet(cfg.root, params.image_size, params.num_workers)
