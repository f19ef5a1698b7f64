"""The embedded default data set: the handwritten digits that scikit-learn ships (no download).

1,797 real 8x8 grey-level digits (UCI), upsampled to 16x16 and repeated on 3 channels so every model takes
them; a fixed, stratified 80/20 train/test split. Crop padding 2, no flip (a mirrored digit is another glyph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ImageData, register_dataset

SIZE = 16
TEST_FRACTION = 0.2


def load_digits_data() -> ImageData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # N,1,8,8 in 0..16
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        test_mask[idx[: round(idx.numel() * TEST_FRACTION)]] = True
    train_images, test_images = images[~test_mask], images[test_mask]
    mean = (train_images.float() / 255).mean().item()
    std = (train_images.float() / 255).std().item()
    return ImageData("digits", train_images, labels[~test_mask], test_images, labels[test_mask],
                     [str(d) for d in range(10)], (mean,) * 3, (std,) * 3, pad=2, hflip=False)


@register_dataset("digits")
def digits(cfg, params) -> ImageData:
    return load_digits_data()
