"""Image-file data sets: decoded and augmented in DataLoader worker processes, batched as the engine expects.

`FileImageData` follows the protocol of `ImageData` (data/base.py: LabelledSplits, `train_loader`,
`test_batches`); what differs is where the pixels live: in files, read by worker processes.

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

Transforms (PIL, bilinear resampling; each returns a uint8 C x H x W tensor):
- `SmallImageTransform(size, pad, flip)`: resize, then (training) a zero-padded random crop and a flip (CIFAR).
- `RandomResizedCropFlip(size)`: the ImageNet training augmentation (area 8-100 %, aspect 3/4-4/3, flip).
- `ResizeCenterCrop(resize, size)`: the ImageNet evaluation transform (shorter side to `resize`, centre crop).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError, one_line
from .base import Augment, Batch, LabelledSplits, complement, step_seed
from .decode import open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_WORKERS = 64  # DataLoader worker processes: more only stall the machine while they start


# ------------------------------------------------------------------------------------------------ decoding


def load_rgb(path: str):
    """The image at `path` as an RGB PIL image; an unreadable file is a UserError naming it."""
    try:
        with open(path, "rb") as handle:
            return open_image(handle, path).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        detail = one_line(exc, 200)
        raise UserError(f"cannot decode image {path} ({type(exc).__name__}: {detail}); "
                        "remove or replace the file") from None


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
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    message = lines[-1] if lines else str(exc)
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


# ------------------------------------------------------------------------------------------------ scanning


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, symlinks followed), as sorted paths relative to it; a symlink
    that leads back to a folder on its own path (a loop) is a UserError, not a scan without end."""
    found = []
    root = os.path.realpath(folder)
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        rel = os.path.relpath(directory, folder)
        parts = [] if rel == "." else rel.split(os.sep)
        on_path = {os.path.realpath(os.path.join(folder, *parts[:i])) for i in range(len(parts) + 1)}
        for sub in subdirs:
            target = os.path.realpath(os.path.join(directory, sub))
            if target in on_path or root.startswith(target.rstrip(os.sep) + os.sep):
                raise UserError(f"{os.path.join(directory, sub)} is a symlink back to {target}, a folder on its "
                                "own path: the image folder loops; remove the link")
        for name in sorted(names):
            if is_image_file(name):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def scan_image_folder(folder: Path, class_names: Optional[Sequence[str]] = None
                      ) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """(class names, relative paths, labels) of a `folder/<class>/**/<image>` tree.

    Without `class_names` the sorted class folders define the classes, and each must hold images. With them
    (a val/ split labelled by train/'s classes) every class folder present must be one of them; a class may
    have no images there.
    """
    present = class_folders(folder)
    if not present:
        loose = [name for name in os.listdir(folder) if is_image_file(name)]
        what = f"holds {len(loose)} images but no class folders" if loose else "has no class folders"
        raise UserError(f"{folder} {what}; expected the ImageFolder layout {folder}/<class>/<image files>")
    defining = class_names is None
    if defining:
        class_names = present
    else:
        known = set(class_names)
        unknown = [c for c in present if c not in known]
        if unknown:
            raise UserError(f"{folder} has class folders that the training split lacks: {', '.join(unknown[:5])}"
                            f"{' ...' if len(unknown) > 5 else ''}; both splits must use the same classes")
    label_of = {c: i for i, c in enumerate(class_names)}
    files, labels = [], []
    for name in present:
        images = list_images(folder / name)
        if not images and defining:
            raise UserError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "remove it or add its images")
        files += [os.path.join(name, image) for image in images]
        labels += [label_of[name]] * len(images)
    return list(class_names), as_file_array(files), torch.tensor(labels, dtype=torch.long)


def as_file_array(files: Sequence[str]) -> np.ndarray:
    return np.array([f.encode() for f in files], dtype=bytes) if files else np.zeros(0, dtype="S1")


def stratified_split(labels: torch.Tensor, num_classes: int, fraction: float, seed: int) -> torch.Tensor:
    """A boolean mask of held-out samples: round(fraction * n_c) of each class, by a seeded permutation.

    A class keeps at least one training sample.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        count = min(int(round(idx.numel() * fraction)), max(idx.numel() - 1, 0))
        held_out[idx[:count]] = True
    return held_out


# ------------------------------------------------------------------------------------------------ the data set


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
