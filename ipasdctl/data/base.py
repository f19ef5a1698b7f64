"""The data-set protocol (`DataSet`, `Loader`), and small-image data sets held as one uint8 tensor, batched and
augmented on the training device.

Every batch carries the dataset indices of its samples (per-sample memories need them). The order of an
epoch and the augmentation of every step are functions of (seed, epoch, step) alone, so a run resumed at any
step sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..params import NoParams
from ..registry import Registry

DATASETS: Registry = Registry("dataset")
TEST_SUBSET_SEED = 0  # data.test_subset: one fixed draw, whatever the run's seed (comparisons stay paired)


def register_dataset(name: str, params: type = NoParams):
    """`@register_dataset("imagefolder", ImageFolderParams)` on a factory `(data_config, params) -> data set`: the
    data set's name and its own parameters (a dataclass, bounds declared with params.param), stated once. Its
    parameters sit flat in a recipe's data: section beside the shared keys (data.image_size, ...)."""
    def register(factory):
        factory.Params = params
        return DATASETS.register(name)(factory)
    return register


HeldOutBatches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (x normalised, y), in order


@runtime_checkable
class Loader(Protocol):
    """An epoch's training batches: `TensorLoader` (tensors on the device), `FileLoader` (files decoded by
    DataLoader workers; data/file_loader.py)."""

    def steps(self, epoch: int) -> int:
        """The number of batches of `epoch` (a method's sampler may give epochs of different lengths)."""

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator["Batch"]:
        """The batches of `epoch` from `start_step` on; the same batches whenever it is called (exact resume)."""


@runtime_checkable
class DataSet(Protocol):
    """What the engine, evaluation and export read of a data set, wherever its pixels live: `ImageData` (one
    tensor) and `FileImageData` (files; data/file_loader.py) follow it. The sizes and the derivations of the
    training split come with `LabelledSplits`; a data set implements the rest."""

    name: str
    class_names: list[str]
    mean: Sequence[float]  # per channel, of pixels scaled to 0..1
    std: Sequence[float]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    val_labels: Optional[torch.Tensor]  # None: no validation split
    origin: dict  # how the splits were derived (the run folder's splits.json)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C x H x W of one image as the network sees it."""

    @property
    def num_classes(self) -> int: ...

    @property
    def num_train(self) -> int: ...

    @property
    def num_test(self) -> int: ...

    @property
    def num_val(self) -> int: ...

    def train_loader(self, batches: Callable[[int], list[torch.Tensor]], seed: int, device, channels_last: bool,
                     augment: bool) -> Loader:
        """Training batches in the order `batches(epoch)` gives; augmented (seeded by `seed`) when `augment`."""

    def test_batches(self, batch_size: int, device, channels_last: bool = False) -> HeldOutBatches:
        """The test set, normalised, no augmentation, in order."""

    def val_batches(self, batch_size: int, device, channels_last: bool = False) -> HeldOutBatches:
        """The validation split, as the test batches."""

    def held_out_batches(self, split: str, batch_size: int, device, channels_last: bool = False) -> HeldOutBatches:
        """The batches of "test" or "val"."""

    def held_out_size(self, split: str) -> int: ...

    def take_train(self, indices: torch.Tensor) -> "DataSet":
        """Those training samples only, renumbered 0..n-1."""

    def take_test(self, indices: torch.Tensor) -> "DataSet":
        """Those test samples only."""

    def split_off(self, indices: torch.Tensor) -> "DataSet":
        """Those training samples moved into the validation split."""

    def subset(self, size: int, seed: int = 0) -> "DataSet": ...

    def hold_out_validation(self, size: int, seed: int) -> "DataSet": ...

    def test_part(self, size: int) -> "DataSet": ...

    def with_train_labels(self, labels: torch.Tensor, record: dict) -> "DataSet": ...


class LabelledSplits:
    """The sizes every data set derives from its labels and class names (tensor-held or file-held), and the
    derivations of its training split that do not depend on where the pixels live: the class-balanced
    subset, the validation split held out of it, and noisy training labels.

    A subclass implements the rest of `DataSet` (`take_train`, `take_test`, `split_off`, `train_loader`,
    `test_batches`, `val_batches`, `image_shape`). `origin` records how the splits were derived (written into
    the run folder)."""

    class_names: list[str]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    val_labels: Optional[torch.Tensor]  # None: no validation split
    origin: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_labels.numel())

    @property
    def num_val(self) -> int:
        return 0 if self.val_labels is None else int(self.val_labels.numel())

    def subset(self, size: int, seed: int = 0):
        """A fixed, seeded, class-balanced subset of the training set (its indices become 0..size-1)."""
        return self.take_train(balanced_subset(self.train_labels, size, self.num_classes, seed))

    def hold_out_validation(self, size: int, seed: int):
        """The data set with `size` training images (class-balanced, seeded) moved into a validation split;
        the held-out indices (into the training set as it was) are recorded in `origin`."""
        if size >= self.num_train:
            raise UserError(f"data.val_split={size} leaves no training image (the training set has {self.num_train}); "
                            "hold out fewer images")
        chosen = balanced_subset(self.train_labels, size, self.num_classes, seed, key="data.val_split")
        data = self.split_off(chosen)
        data.origin = {**self.origin, "val_split": {"size": size, "seed": seed, "indices": chosen.tolist()}}
        return data

    def test_part(self, size: int):
        """The data set tested on a fixed, class-balanced part of `size` test images (data.test_subset), drawn
        with TEST_SUBSET_SEED; the kept indices (into the whole test set, sorted) are recorded in `origin`."""
        chosen = balanced_subset(self.test_labels, size, self.num_classes, TEST_SUBSET_SEED, key="data.test_subset",
                                 split="test set")
        data = self.take_test(chosen)
        data.origin = {**self.origin, "test_subset": {"size": size, "seed": TEST_SUBSET_SEED,
                                                      "indices": chosen.tolist()}}
        return data

    def with_train_labels(self, labels: torch.Tensor, record: dict):
        """The data set with other training labels (noisy ones), `record` saying how, under origin.label_noise."""
        return replace(self, train_labels=labels, origin={**self.origin, "label_noise": record})

    def held_out_batches(self, split: str, batch_size: int, device, channels_last: bool = False):
        """Evaluation batches (x normalised, y) of the test or the validation split."""
        if split == "val":
            if self.val_labels is None:
                raise UserError("this data set has no validation split; set data.val_split=N")
            return self.val_batches(batch_size, device, channels_last)
        return self.test_batches(batch_size, device, channels_last)

    def held_out_size(self, split: str) -> int:
        return self.num_val if split == "val" else self.num_test


@dataclass
class ImageData(LabelledSplits):
    """A labelled image-classification data set, train and test split, as uint8 N x C x H x W tensors."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: Sequence[float]
    std: Sequence[float]
    pad: int = 4  # random-crop padding (0: no crop)
    hflip: bool = True
    val_images: Optional[torch.Tensor] = None
    val_labels: Optional[torch.Tensor] = None
    origin: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def train_loader(self, batches, seed: int, device, channels_last: bool, augment: bool) -> "TensorLoader":
        aug = Augment(self.mean, self.std, self.pad if augment else 0, self.hflip and augment, device)
        return TensorLoader(self.train_images, self.train_labels, aug, batches, seed, device, channels_last)

    def test_batches(self, batch_size: int, device, channels_last: bool = False):
        """Test-time batches (x normalised, y), no augmentation, in order."""
        aug = Augment(self.mean, self.std, 0, False, device)
        return eval_batches(self.test_images, self.test_labels, aug, batch_size, device, channels_last)

    def val_batches(self, batch_size: int, device, channels_last: bool = False):
        """Validation batches, as the test batches."""
        aug = Augment(self.mean, self.std, 0, False, device)
        return eval_batches(self.val_images, self.val_labels, aug, batch_size, device, channels_last)

    def take_train(self, indices: torch.Tensor) -> "ImageData":
        return replace(self, train_images=self.train_images[indices].contiguous(),
                       train_labels=self.train_labels[indices].contiguous())

    def take_test(self, indices: torch.Tensor) -> "ImageData":
        return replace(self, test_images=self.test_images[indices].contiguous(),
                       test_labels=self.test_labels[indices].contiguous())

    def split_off(self, indices: torch.Tensor) -> "ImageData":
        keep = complement(indices, self.num_train)
        return replace(self.take_train(keep), val_images=self.train_images[indices].contiguous(),
                       val_labels=self.train_labels[indices].contiguous())


def complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """The sorted indices of 0..size-1 that are not in `indices`."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[indices] = False
    return torch.nonzero(keep).flatten()


def balanced_subset(labels: torch.Tensor, size: int, num_classes: int, seed: int,
                    key: str = "data.train_subset", split: str = "training set") -> torch.Tensor:
    """`size` indices, as equal a share per class as the classes allow, chosen by a seeded permutation
    (`key` names the recipe key in errors, `split` what `labels` label)."""
    if size <= 0:
        raise UserError(f"{key} must be positive, got {size}")
    if size > labels.numel():
        raise UserError(f"{key}={size} is larger than the {split} ({labels.numel()} images)")
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    per_class = [idx[torch.randperm(idx.numel(), generator=generator)] for idx in per_class]
    quota = [size // num_classes + (1 if c < size % num_classes else 0) for c in range(num_classes)]
    # classes with too few samples give their shortfall to the others, in class order
    short = sum(max(0, q - idx.numel()) for q, idx in zip(quota, per_class))
    quota = [min(q, idx.numel()) for q, idx in zip(quota, per_class)]
    for c in range(num_classes):
        extra = min(short, per_class[c].numel() - quota[c])
        quota[c] += extra
        short -= extra
    chosen = torch.cat([idx[:q] for q, idx in zip(quota, per_class)])
    return chosen.sort().values


def step_seed(seed: int, epoch: int, step: int, stream: int) -> int:
    """A distinct 63-bit seed per (run seed, epoch, step, stream), stable across processes and resumes."""
    value = (seed * 1_000_003 + epoch) * 1_000_033 + step
    value = value * 31 + stream
    return (value * 0x9E3779B97F4A7C15) % (2**63 - 1)


class Augment:
    """Random crop with zero padding, horizontal flip and normalisation, as batched tensor ops."""

    def __init__(self, mean, std, pad: int, hflip: bool, device: torch.device):
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # x/255 - mean) / std  ==  x * scale + shift
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.pad = pad
        self.hflip = hflip

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self.scale).add_(self.shift)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        if self.pad > 0:
            padded = F.pad(images, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (batch,), device=device, generator=generator)
            dx = torch.randint(0, 2 * self.pad + 1, (batch,), device=device, generator=generator)
            rows = (dy[:, None] + torch.arange(height, device=device)).view(batch, 1, height, 1)
            cols = (dx[:, None] + torch.arange(width, device=device)).view(batch, 1, 1, width)
            images = padded.gather(2, rows.expand(-1, padded.shape[1], -1, padded.shape[3]))
            images = images.gather(3, cols.expand(-1, images.shape[1], height, -1))
        if self.hflip:
            flip = torch.rand(batch, device=device, generator=generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
        return self.normalize(images)


@dataclass
class Batch:
    images: torch.Tensor  # augmented, normalised, float
    labels: torch.Tensor
    indices: torch.Tensor  # dataset indices
    raw: torch.Tensor  # the same images before augmentation (uint8), for methods that need other views
    epoch: int
    step: int
    view: Callable[[torch.Tensor, int], torch.Tensor] = field(repr=False, default=None)  # (raw, stream) -> new view


class RandomBatches:
    """The default order: a seeded permutation per epoch, split into batches (the last one may be short)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int, drop_last: bool = False):
        self.num = int(labels.numel())
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last

    def __call__(self, epoch: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0, 0))
        order = torch.randperm(self.num, generator=generator)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        return batches


class TensorLoader:
    """Yields Batch objects for an epoch from device-resident uint8 tensors.

    `batches(epoch)` gives the list of index tensors of that epoch (the default is a random permutation; a
    method may bring a sampler of its own, e.g. class pairs). Everything random is seeded per step.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: Optional[Augment],
        batches: Callable[[int], list[torch.Tensor]],
        seed: int,
        device: torch.device,
        channels_last: bool = False,
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.augment = augment
        self.batches = batches
        self.seed = seed
        self.device = device
        self.channels_last = channels_last
        self.generator = torch.Generator(device=device)

    def steps(self, epoch: int) -> int:
        return len(self.batches(epoch))

    def _view(self, raw: torch.Tensor, epoch: int, step: int, stream: int) -> torch.Tensor:
        if self.augment is None:
            raise RuntimeError("no augmentation configured")
        self.generator.manual_seed(step_seed(self.seed, epoch, step, stream))
        out = self.augment(raw, self.generator)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.batches(epoch)
        for step in range(start_step, len(plan)):
            indices = plan[step].to(self.device, non_blocking=True)
            raw = self.images.index_select(0, indices)
            labels = self.labels.index_select(0, indices)
            images = self._view(raw, epoch, step, 1)
            yield Batch(
                images=images,
                labels=labels,
                indices=indices,
                raw=raw,
                epoch=epoch,
                step=step,
                view=lambda r, stream, _e=epoch, _s=step: self._view(r, _e, _s, 2 + stream),
            )


def eval_batches(images: torch.Tensor, labels: torch.Tensor, augment: Augment, batch_size: int,
                 device: torch.device, channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Test-time batches: no augmentation, normalised, in order."""
    for start in range(0, labels.numel(), batch_size):
        x = augment.normalize(images[start:start + batch_size].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels[start:start + batch_size].to(device, non_blocking=True)
