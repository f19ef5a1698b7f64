"""`imagenet`: ILSVRC-2012 in the ImageFolder layout, `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG`.

The official validation archive is flat (50,000 images and a ground-truth file); sort it into one folder per
class first (the widely used `valprep.sh` does). Classes are the sorted wnid folders of train/ (1000).
Decoded in DataLoader workers (data/file_loader.py). The standard recipe (torchvision's reference): training is a
random-resized crop to 224 (8-100 % of the area, aspect 3/4-4/3) and a horizontal flip; evaluation resizes
the shorter side to 256 and takes the centre 224 x 224. `data.image_size` S changes 224 to S and 256 to
round(S * 256 / 224). Normalisation: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import UserError
from .base import register_dataset
from .file_loader import FileImageData
from .folders import is_image_file, scan_image_folder
from .imagefolder import DecodedImageParams, check_image_size, require_folder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RandomResizedCropFlip, ResizeCenterCrop

TRAIN_SIZE = 224
EVAL_RESIZE = 256


def load_imagenet(root: Optional[str], image_size: Optional[int] = None, num_workers: int = 2) -> FileImageData:
    folder = require_folder(root, "imagenet", "train/<wnid>/ and val/<wnid>/ (ILSVRC-2012 as image folders)")
    missing = [split for split in ("train", "val") if not (folder / split).is_dir()]
    if missing:
        raise UserError(f"{folder} lacks {' and '.join(s + '/' for s in missing)}; point --data at the folder "
                        "that holds train/<wnid>/ and val/<wnid>/")
    loose = [name for name in os.listdir(folder / "val") if is_image_file(name)]
    if loose:
        raise UserError(f"{folder / 'val'} holds {len(loose)} images directly: sort them into val/<wnid>/ "
                        "folders by the ground truth first (e.g. with the widely used valprep.sh)")
    size = check_image_size(image_size, TRAIN_SIZE)
    class_names, train_files, train_labels = scan_image_folder(folder / "train")
    _, test_files, test_labels = scan_image_folder(folder / "val", class_names)
    eval_resize = int(round(size * EVAL_RESIZE / TRAIN_SIZE))
    return FileImageData(name="imagenet", train_root=str(folder / "train"), train_files=train_files,
                         train_labels=train_labels, test_root=str(folder / "val"), test_files=test_files,
                         test_labels=test_labels, class_names=class_names, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         train_transform=RandomResizedCropFlip(size),
                         eval_transform=ResizeCenterCrop(eval_resize, size), image_size=size, num_workers=num_workers)


@register_dataset("imagenet", DecodedImageParams)
def imagenet(cfg, params: DecodedImageParams) -> FileImageData:
    return load_imagenet(cfg.root, params.image_size, params.num_workers)
