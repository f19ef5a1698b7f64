"""Transforms of decoded images (PIL, bilinear resampling; each returns a uint8 C x H x W tensor), and the pair a
data set of a given image size uses.

- `SmallImageTransform(size, pad, flip)`: resize, then (training) a zero-padded random crop and a flip (CIFAR).
- `RandomResizedCropFlip(size)`: the ImageNet training augmentation (area 8-100 %, aspect 3/4-4/3, flip).
- `ResizeCenterCrop(resize, size)`: the ImageNet evaluation transform (shorter side to `resize`, centre crop).

`transforms_for(size)`, by image size S:
- S <= 64 (small images, as CIFAR and Tiny ImageNet): resize to S x S; training adds a random S x S crop of
  the image zero-padded by 4 pixels and a horizontal flip; evaluation is the resize alone.
- S > 64 (the ImageNet recipe): training is a random-resized crop to S x S and a flip; evaluation resizes the
  shorter side to S / 0.875 (256 for 224) and takes the centre crop.
The same evaluation transform is what `predict` applies to an image (deploy/predict.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_SIZE = 64  # at or below: the small-image augmentation (pad-and-crop)
SMALL_IMAGE_PAD = 4
EVAL_CROP_FRACTION = 0.875  # 224 / 256


def to_uint8_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class SmallImageTransform:
    """Resize to size x size; with `pad` > 0 a random size x size crop of the zero-padded image; random flip."""

    size: int
    pad: int = 0
    flip: bool = False

    def __call__(self, image, rng: Optional[random.Random]) -> torch.Tensor:
        from PIL import Image

        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        out = to_uint8_tensor(image)
        if rng is None:
            return out
        if self.pad > 0:
            padded = torch.nn.functional.pad(out, (self.pad,) * 4)
            dy, dx = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
            out = padded[:, dy:dy + self.size, dx:dx + self.size].contiguous()
        if self.flip and rng.random() < 0.5:
            out = out.flip(2).contiguous()
        return out


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """A random crop of `scale` of the area and `ratio` aspect, resized to size x size; a random flip."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height), torchvision's RandomResizedCrop.get_params with `rng`."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, width - w), rng.randint(0, height - h), w, h
        in_ratio = width / height  # fall back to a central crop of the allowed aspect
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image, rng: Optional[random.Random]) -> torch.Tensor:
        from PIL import Image

        if rng is None:
            raise ValueError("RandomResizedCropFlip is a training transform: it needs a random generator")
        left, top, w, h = self.crop_box(image.width, image.height, rng)
        # crop, then resize (as torchvision; resizing with a `box` would also sample pixels outside the crop)
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        out = to_uint8_tensor(image)
        if self.flip and rng.random() < 0.5:
            out = out.flip(2).contiguous()
        return out


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Shorter side to `resize` (aspect kept), then the central size x size crop."""

    resize: int
    size: int

    def __call__(self, image, rng: Optional[random.Random] = None) -> torch.Tensor:
        from PIL import Image

        width, height = image.size
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return to_uint8_tensor(image.crop((left, top, left + self.size, top + self.size)))


def transforms_for(size: int):
    """(training transform, evaluation transform) for images of size x size (see the module docstring)."""
    if size <= SMALL_IMAGE_SIZE:
        return SmallImageTransform(size, SMALL_IMAGE_PAD, True), SmallImageTransform(size)
    return RandomResizedCropFlip(size), ResizeCenterCrop(int(round(size / EVAL_CROP_FRACTION)), size)
