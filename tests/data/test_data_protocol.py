"""The data-set protocol (data/base.py: DataSet, Loader) is what every data set follows, tensor-held or file-held:
the engine, evaluation and export read nothing else."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ipasdctl.config import DataConfig
from ipasdctl.data import DataSet, Loader, RandomBatches, build_data
from ipasdctl.data.imagefolder import load_image_folder


def _image_folder(root, classes=2, per_class=3, size=8):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_tensor_and_file_data_sets_and_their_loaders_follow_the_protocol(tmp_path):
    tensor_held = build_data(DataConfig(name="digits"))
    file_held = load_image_folder(str(_image_folder(tmp_path / "folder")), image_size=8, val_fraction=0.34,
                                  num_workers=0)
    for data in (tensor_held, file_held):
        assert isinstance(data, DataSet), type(data).__name__
        loader = data.train_loader(RandomBatches(data.train_labels, 4, seed=0), 0, torch.device("cpu"), False, False)
        assert isinstance(loader, Loader), type(loader).__name__
        batch = next(iter(loader.epoch(0)))
        assert batch.images.shape[1:] == data.image_shape
        assert loader.steps(0) == -(-data.num_train // 4)


def test_an_object_missing_a_member_is_not_a_data_set():
    data = build_data(DataConfig(name="digits"))

    class NoLoader:
        def __init__(self):
            for name in ("name", "class_names", "mean", "std", "train_labels", "test_labels", "val_labels", "origin"):
                setattr(self, name, getattr(data, name))

    assert not isinstance(NoLoader(), DataSet)
