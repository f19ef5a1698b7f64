"""The file-backed loader: image-file data sets decoded and augmented in DataLoader worker processes, batched as
the engine expects.

`FileImageData` follows the data-set protocol (data/base.py: `DataSet`) as `ImageData` does; what differs is
where the pixels live: in files, read by worker processes. Finding the files is data/folders.py's; decoding one
and its transforms are data/decode.py's and data/transforms.py's.

- The epoch's order is still the `batches(epoch)` plan (the default random order or a method's own sampler):
  the loader hands exactly those index lists to a DataLoader as its batch sampler, so paired or repeated
  batches (cs-kd, dlb) work unchanged.
- Augmentation is seeded per sample from (run seed, epoch, step, position in the batch) with `step_seed`, so
  it is the same whichever worker decodes the sample, and a run resumed mid-epoch sees the batches the
  uninterrupted run saw.
- Workers (persistent across epochs) return uint8 images, 4x less to copy than floats; the pinned batch is
  normalised on the device.
- `Batch.raw` is None and `Batch.view` raises a UserError: another augmented view needs the decoded image, which
  only the worker had, so methods that need one (ddgsd) run on the tensor-resident data sets (cifar10, digits...).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError, one_line
from .base import Augment, Batch, LabelledSplits, complement, step_seed
from .decode import load_rgb
from .transforms import SmallImageTransform

MAX_WORKERS = 64  # DataLoader worker processes: more only stall the machine while they start


def check_workers(num_workers: int) -> int:
    if not 0 <= num_workers <= MAX_WORKERS:
        raise UserError(f"data.num_workers must be from 0 (decode in the training process) to {MAX_WORKERS}, "
                        f"got {num_workers}")
    return num_workers


def sample_seed(base: int, position: int) -> int:
    return (base + (position + 1) * 0x9E3779B97F4A7C15) % (2**63 - 1)


class FileDataset(Dataset):
    """Map-style: key (index, seed or None) -> uint8 image; the seed drives that sample's augmentation."""

    def __init__(self, root: str, files: np.ndarray, transform: Callable):
        self.root = root
        self.files = files  # relative paths as a numpy bytes array: cheap to share with forked workers
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index].decode())

    def __getitem__(self, key) -> torch.Tensor:
        index, seed = key
        rng = random.Random(seed) if seed is not None else None
        return self.transform(load_rgb(self.path(index)), rng)


class _Plan:
    """A batch sampler whose batches are set before each pass (so one DataLoader keeps its workers)."""

    def __init__(self):
        self.keys: list[list[tuple[int, Optional[int]]]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _worker_error(exc: Exception) -> UserError:
    """A UserError raised in a worker arrives wrapped in its traceback: keep its own last line."""
    message = one_line(exc, line=-1)
    prefix = "ipasdctl.errors.UserError: "
    return UserError(message[len(prefix):] if message.startswith(prefix) else message)


def make_loader(dataset: Dataset, plan: _Plan, num_workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, pin_memory=pin,
                      persistent_workers=num_workers > 0)


def iterate(loader: DataLoader) -> Iterator[torch.Tensor]:
    try:
        yield from loader
    except UserError as exc:
        raise _worker_error(exc) from None


def decode_all(root: str, files: np.ndarray, size: int, num_workers: int, chunk: int = 256) -> torch.Tensor:
    """Every image resized to size x size, as one uint8 N x 3 x size x size tensor (decoded by workers)."""
    check_workers(num_workers)
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    plan = _Plan()
    plan.keys = [[(i, None) for i in range(start, min(start + chunk, len(files)))]
                 for start in range(0, len(files), chunk)]
    loader = DataLoader(FileDataset(root, files, SmallImageTransform(size)), batch_sampler=plan,
                        num_workers=num_workers)
    start = 0
    for images in iterate(loader):
        out[start:start + images.shape[0]] = images
        start += images.shape[0]
    return out


@dataclass
class FileImageData(LabelledSplits):
    """A labelled image-classification data set held as files: `<root>/<relative path>` per sample."""

    name: str
    train_root: str
    train_files: np.ndarray
    train_labels: torch.Tensor
    test_root: str
    test_files: np.ndarray
    test_labels: torch.Tensor
    class_names: list[str]
    mean: Sequence[float]
    std: Sequence[float]
    train_transform: Callable
    eval_transform: Callable
    image_size: int
    num_workers: int = 2
    val_files: Optional[np.ndarray] = None  # relative to train_root: the validation split is training images
    val_labels: Optional[torch.Tensor] = None
    origin: dict = field(default_factory=dict)
    _eval_loaders: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        check_workers(self.num_workers)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def train_path(self, index: int) -> str:
        return os.path.join(self.train_root, self.train_files[index].decode())

    def train_loader(self, batches, seed: int, device, channels_last: bool, augment: bool) -> "FileLoader":
        transform = self.train_transform if augment else self.eval_transform
        dataset = FileDataset(self.train_root, self.train_files, transform)
        return FileLoader(self.name, dataset, self.train_labels, self.mean, self.std, batches, seed, device,
                          channels_last, self.num_workers, seeded=augment)

    def test_batches(self, batch_size: int, device, channels_last: bool = False):
        """Test-time batches (x normalised, y), evaluation transform, in order; workers kept between calls."""
        return self._eval_batches("test", self.test_root, self.test_files, self.test_labels, batch_size, device,
                                  channels_last)

    def val_batches(self, batch_size: int, device, channels_last: bool = False):
        """Validation batches, as the test batches."""
        return self._eval_batches("val", self.train_root, self.val_files, self.val_labels, batch_size, device,
                                  channels_last)

    def _eval_batches(self, split: str, root: str, files: np.ndarray, labels: torch.Tensor, batch_size: int,
                      device, channels_last: bool):
        device = torch.device(device)
        key = (split, batch_size, device.type)
        count = int(labels.numel())
        if key not in self._eval_loaders:
            plan = _Plan()
            plan.keys = [[(i, None) for i in range(start, min(start + batch_size, count))]
                         for start in range(0, count, batch_size)]
            dataset = FileDataset(root, files, self.eval_transform)
            self._eval_loaders[key] = make_loader(dataset, plan, self.num_workers, device.type == "cuda")
        normalise = Augment(self.mean, self.std, 0, False, device)
        labels = labels.to(device)
        start = 0
        for images in iterate(self._eval_loaders[key]):
            x = normalise.normalize(images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels[start:start + x.shape[0]]
            start += x.shape[0]

    def take_train(self, indices: torch.Tensor) -> "FileImageData":
        return replace(self, train_files=self.train_files[indices.numpy()],
                       train_labels=self.train_labels[indices].contiguous(), _eval_loaders={})

    def take_test(self, indices: torch.Tensor) -> "FileImageData":
        return replace(self, test_files=self.test_files[indices.numpy()],
                       test_labels=self.test_labels[indices].contiguous(), _eval_loaders={})

    def split_off(self, indices: torch.Tensor) -> "FileImageData":
        keep = complement(indices, self.num_train)
        return replace(self.take_train(keep), val_files=self.train_files[indices.numpy()],
                       val_labels=self.train_labels[indices].contiguous(), _eval_loaders={})


class FileLoader:
    """Yields Batch objects for an epoch; the epoch's batches are `batches(epoch)` (index tensors)."""

    def __init__(self, name: str, dataset: FileDataset, labels: torch.Tensor, mean, std,
                 batches: Callable[[int], list[torch.Tensor]], seed: int, device, channels_last: bool,
                 num_workers: int, seeded: bool = True):
        self.name = name
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        self.batches = batches
        self.seed = seed
        self.channels_last = channels_last
        self.seeded = seeded
        self.normalise = Augment(mean, std, 0, False, self.device)
        self.plan = _Plan()
        self.loader = make_loader(dataset, self.plan, num_workers, self.device.type == "cuda")

    def steps(self, epoch: int) -> int:
        return len(self.batches(epoch))

    def keys(self, epoch: int, step: int, indices: torch.Tensor) -> list[tuple[int, Optional[int]]]:
        if not self.seeded:
            return [(int(i), None) for i in indices.tolist()]
        base = step_seed(self.seed, epoch, step, 1)
        return [(int(i), sample_seed(base, position)) for position, i in enumerate(indices.tolist())]

    def _no_view(self, raw, stream: int):
        raise UserError(f"this method needs extra augmented views of each batch, which data set '{self.name}' "
                        "cannot make (its images are decoded in DataLoader workers); use it with a "
                        "tensor-resident data set (cifar10, cifar100, tiny-imagenet, digits)")

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.batches(epoch)
        self.plan.keys = [self.keys(epoch, step, plan[step]) for step in range(start_step, len(plan))]
        for step, images in enumerate(iterate(self.loader), start=start_step):
            indices = plan[step].to(self.device, non_blocking=True)
            x = self.normalise.normalize(images.to(self.device, non_blocking=True))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(images=x, labels=self.labels.index_select(0, indices), indices=indices, raw=None,
                        epoch=epoch, step=step, view=self._no_view)
