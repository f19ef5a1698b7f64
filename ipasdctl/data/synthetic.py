"""`synthetic`: CIFAR-10-shaped random images (50,000 train / 10,000 test, 10 classes, 32x32 unless
data.image_size says otherwise), seeded. For benchmarks and GPU checks where real data is not at hand;
nothing can be learnt from it beyond memorisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import ImageData, register_dataset

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 50_000, 10_000, 10


@dataclass
class SyntheticParams:
    image_size: Optional[int] = None  # pixels a side (unset: 32)


@register_dataset("synthetic", SyntheticParams)
def synthetic(cfg, params: SyntheticParams) -> ImageData:
    size = params.image_size or 32
    generator = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (NUM_TRAIN + NUM_TEST, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(NUM_TRAIN + NUM_TEST) % NUM_CLASSES
    return ImageData("synthetic", images[:NUM_TRAIN], labels[:NUM_TRAIN], images[NUM_TRAIN:], labels[NUM_TRAIN:],
                     [f"class_{i}" for i in range(NUM_CLASSES)], (0.5,) * 3, (0.25,) * 3, pad=4, hflip=True)
