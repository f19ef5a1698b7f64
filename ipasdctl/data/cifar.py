"""CIFAR-10 / CIFAR-100 in the original "python version" layout, read with a restricted unpickler.

torchvision's CIFAR classes check md5 sums and refuse re-exported copies; this loader reads the files
themselves (official or not) and admits only what those pickles contain: dicts, lists, bytes/str, ints and
numpy arrays. Anything else in the file (a pickled function call, say) is refused before it can run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..registry import DATASETS
from .base import ImageData

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle (str -> bytes, nothing else)
}

_WHERE = "https://www.cs.toronto.edu/~kriz/cifar.html"


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            if module.startswith("numpy.core."):
                module = "numpy._core." + module[len("numpy.core."):] if hasattr(np, "_core") else module
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR file")


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = RestrictedUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} is not a plain CIFAR file ({exc}); refusing to load it") from None
    except (EOFError, ValueError, IndexError, KeyError, TypeError, OSError) as exc:
        raise UserError(f"{path} is truncated or corrupt ({type(exc).__name__}); download the data set again ({_WHERE})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict, found {type(data).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _images_labels(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UserError(f"{path} has no '{'data' if 'data' not in batch else label_key}' entry; is it a CIFAR file?")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise UserError(f"{path} is corrupt: expected uint8 N x 3072 images and N labels, "
                        f"found {data.dtype} {tuple(data.shape)} and {labels.shape[0]} labels")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def find_folder(root: str | None, folder: str, dataset: str) -> Path:
    if not root:
        raise UserError(f"{dataset} needs --data DIR: the folder that contains {folder}/ (download the "
                        f"'python version' from {_WHERE} and unpack it there)")
    base = Path(root).expanduser()
    for candidate in (base / folder, base):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    raise UserError(f"{base} does not contain {folder}/; point --data at the folder holding it "
                    f"(the 'python version' from {_WHERE})")


def _require(folder: Path, names: list[str]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; expected the full 'python version' layout from {_WHERE}")


def _names(values) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def load_cifar10(root: str | None) -> ImageData:
    folder = find_folder(root, "cifar-10-batches-py", "cifar10")
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    _require(folder, train_files + ["test_batch"])
    parts = [_images_labels(folder / name, "labels") for name in train_files]
    test_images, test_labels = _images_labels(folder / "test_batch", "labels")
    names = [f"class_{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        names = _names(read_pickle(folder / "batches.meta").get("label_names", names))
    return ImageData("cifar10", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                     test_images, test_labels, names, CIFAR10_MEAN, CIFAR10_STD, pad=4, hflip=True)


def load_cifar100(root: str | None) -> ImageData:
    folder = find_folder(root, "cifar-100-python", "cifar100")
    _require(folder, ["train", "test"])
    train_images, train_labels = _images_labels(folder / "train", "fine_labels")
    test_images, test_labels = _images_labels(folder / "test", "fine_labels")
    names = [f"class_{i}" for i in range(100)]
    if (folder / "meta").is_file():
        names = _names(read_pickle(folder / "meta").get("fine_label_names", names))
    return ImageData("cifar100", train_images, train_labels, test_images, test_labels, names,
                     CIFAR100_MEAN, CIFAR100_STD, pad=4, hflip=True)


@DATASETS.register("cifar10")
def cifar10(cfg) -> ImageData:
    return load_cifar10(cfg.root)


@DATASETS.register("cifar100")
def cifar100(cfg) -> ImageData:
    return load_cifar100(cfg.root)
