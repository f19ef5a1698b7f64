"""CIFAR-10 / CIFAR-100 in the original "python version" layout, read with a restricted unpickler.

torchvision's CIFAR classes check md5 sums and refuse re-exported copies; this loader reads the files
themselves (official or not) and admits only what those pickles contain: dicts, lists, bytes/str, ints and
numpy arrays. Anything else in the file (a pickled function call, say) is refused before it can run.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import ImageData, register_dataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 writes bytes into a protocol-2 pickle: _codecs.encode(str, 'latin1'); nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how bytes are stored")
    return text.encode("latin1")


def _plain_bytes(*args) -> bytes:
    """How an empty numpy array's buffer is pickled: bytes() of nothing (never bytes(n), which allocates n)."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise _Refused("it calls bytes() with arguments a CIFAR file never holds")


# (module, name) -> the object the pickle may name: numpy arrays (how NumPy 1.x and 2.x pickle them, protocol
# 2 to 5), their dtypes, and bytes. Dicts, lists, str, bytes, ints and floats need no global at all.
_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy.core.numeric", "_frombuffer"): None,
    ("numpy._core.numeric", "_frombuffer"): None,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _plain_bytes,
    ("builtins", "bytes"): _plain_bytes,
}

_WHERE = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _Refused(pickle.UnpicklingError):
    """The file names something a CIFAR file never holds (and that could run code)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only dicts, lists, bytes/str, ints, floats and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise _Refused(f"it names '{module}.{name}', which a CIFAR file never holds")
        target = _ALLOWED[(module, name)]
        if target is None:  # numpy helpers whose home moved between 1.x (numpy.core) and 2.x (numpy._core)
            home = module.replace("numpy.core.", "numpy._core.") if hasattr(np, "_core") else \
                module.replace("numpy._core.", "numpy.core.")
            target = getattr(importlib.import_module(home), name)
        return target


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = RestrictedUnpickler(handle, encoding="latin1").load()
    except _Refused as exc:
        raise UserError(f"{path} is not a plain CIFAR file: {exc}; refusing to load it (get the data from {_WHERE})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            MemoryError, OSError, OverflowError, RecursionError) as exc:
        raise UserError(f"{path} is truncated or corrupt ({type(exc).__name__}); download the data set again "
                        f"({_WHERE})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict, found {type(data).__name__}); "
                        f"download the data set again ({_WHERE})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def _images_labels(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UserError(f"{path} has no '{'data' if 'data' not in batch else label_key}' entry; is it a CIFAR file?")
    data = batch["data"]
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if labels.ndim != 1:
            raise ValueError(labels.ndim)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise UserError(f"{path} is corrupt: its '{label_key}' are not a list of integers; download the data set "
                        f"again ({_WHERE})") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or data.shape[0] != labels.shape[0]:
        found = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise UserError(f"{path} is corrupt: expected uint8 N x 3072 images and N labels, "
                        f"found {found} and {labels.shape[0]} labels")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def find_folder(root: str | None, folder: str, dataset: str) -> Path:
    if not root:
        raise UserError(f"{dataset} needs --data DIR: the folder that contains {folder}/ (download the "
                        f"'python version' from {_WHERE} and unpack it there)")
    base = Path(root).expanduser()
    if not base.exists():
        raise UserError(f"--data {base} does not exist; point --data at the folder that contains {folder}/ "
                        f"(the 'python version' from {_WHERE})")
    for candidate in (base / folder, base):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    raise UserError(f"{base} does not contain {folder}/; point --data at the folder holding it "
                    f"(the 'python version' from {_WHERE})")


def _require(folder: Path, names: list[str]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; expected the full 'python version' layout from {_WHERE}")


def _names(path: Path, values) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, (bytes, str)) for v in values):
        raise UserError(f"{path} is corrupt: its class names are not a list of names; download the data set again "
                        f"({_WHERE})")
    return [v.decode("latin1") if isinstance(v, bytes) else v for v in values]


def load_cifar10(root: str | None) -> ImageData:
    folder = find_folder(root, "cifar-10-batches-py", "cifar10")
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    _require(folder, train_files + ["test_batch"])
    parts = [_images_labels(folder / name, "labels") for name in train_files]
    test_images, test_labels = _images_labels(folder / "test_batch", "labels")
    names = [f"class_{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        names = _names(folder / "batches.meta", read_pickle(folder / "batches.meta").get("label_names", names))
    return ImageData("cifar10", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                     test_images, test_labels, names, CIFAR10_MEAN, CIFAR10_STD, pad=4, hflip=True)


def load_cifar100(root: str | None) -> ImageData:
    folder = find_folder(root, "cifar-100-python", "cifar100")
    _require(folder, ["train", "test"])
    train_images, train_labels = _images_labels(folder / "train", "fine_labels")
    test_images, test_labels = _images_labels(folder / "test", "fine_labels")
    names = [f"class_{i}" for i in range(100)]
    if (folder / "meta").is_file():
        names = _names(folder / "meta", read_pickle(folder / "meta").get("fine_label_names", names))
    return ImageData("cifar100", train_images, train_labels, test_images, test_labels, names,
                     CIFAR100_MEAN, CIFAR100_STD, pad=4, hflip=True)


@register_dataset("cifar10")
def cifar10(cfg, params) -> ImageData:
    return load_cifar10(cfg.root)


@register_dataset("cifar100")
def cifar100(cfg, params) -> ImageData:
    return load_cifar100(cfg.root)
