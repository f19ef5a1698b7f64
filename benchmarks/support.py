"""Benchmark support (not part of the package): measurements behind the performance claims: method overhead per training step, the data pipeline against
the common torchvision+PIL DataLoader, and the size of per-sample memories. Used by benchmarks/ (run on
demand with pytest-benchmark) and benchmarks/gpu_check.py; none of it runs in the test suite's hot path.

Timings synchronise the device around each timed call and alternate the compared variants repetition by
repetition, so slow drifts of the machine (other load, clocks) hit both sides alike.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from ipasdctl import runtime
from ipasdctl.config import Recipe, load_recipe
from ipasdctl.methods.memory import DTYPES
from ipasdctl.training import Progress, Trainer, resolve_recipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quick_recipe(method: str, arch: str = "resnet8", dataset: str = "synthetic", batch_size: int = 128,
                 device: str = "cpu", train_subset: Optional[int] = 4096, root: Optional[str] = None,
                 precision: str = "auto", extra: Optional[dict] = None) -> Recipe:
    overrides = {
        "method": {"name": method, **((extra or {}).get("method", {}))},
        "model": {"arch": arch},
        "data": {"name": dataset, "train_subset": train_subset, "root": root},
        "train": {"batch_size": batch_size, "device": device, "epochs": 10, "precision": precision},
        "optim": {"warmup_epochs": 0},
    }
    return load_recipe("demo", overrides)


class StepRunner:
    """One method's training steps on real batches of its own sampler, outside the engine's bookkeeping."""

    def __init__(self, recipe: Recipe):
        self.trainer = Trainer(resolve_recipe(recipe), None, Progress(enabled=False))
        self.device = self.trainer.device
        self.trainer.method.on_epoch_start(1 if recipe.train.epochs > 1 else 0)
        self._batches = self._batch_iter()

    def _batch_iter(self):
        epoch = 1  # past epoch 0, so that memories and prototypes are in use
        while True:
            yield from self.trainer.loader.epoch(epoch)
            epoch += 1

    def prepare_epoch_one(self) -> None:
        """Give methods with epoch-0 special cases (IPASD, PS-KD) their later-epoch state."""
        t = self.trainer
        t.method.on_epoch_start(0)
        for i, batch in enumerate(t.loader.epoch(0)):
            if i >= 2:
                break
            self.step(batch)
        t.method.on_epoch_end(0)
        t.method.on_epoch_start(1)

    def step(self, batch=None) -> None:
        """The engine's own training step (the one `train` runs), at the recipe's peak learning rate."""
        batch = batch if batch is not None else next(self._batches)
        self.trainer.train_step(batch, self.trainer.recipe.optim.lr)

    def timed_step(self) -> float:
        batch = next(self._batches)
        sync(self.device)
        start = time.perf_counter()
        self.step(batch)
        sync(self.device)
        return time.perf_counter() - start


def overhead_ratios(methods: list[str], reference: str = "ce", reps: int = 30, warmup: int = 3,
                    recipe_factory: Callable[[str], Recipe] = quick_recipe) -> dict[str, dict]:
    """Median step time of each method / the reference's: every repetition times one step of each, in a
    shuffled order (seeded), so that drifts of the machine and the cost of following a heavier step spread
    over all of them."""
    torch.manual_seed(0)
    runners = {name: StepRunner(recipe_factory(name)) for name in dict.fromkeys([reference, *methods])}
    for runner in runners.values():
        runner.prepare_epoch_one()
        for _ in range(warmup):
            runner.step()
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)  # a fresh order every repetition: no method always follows the same one
        for name in order:
            times[name].append(runners[name].timed_step())
    base = statistics.median(times[reference])
    return {name: {"median_s": statistics.median(values), "ratio": statistics.median(values) / base,
                   "images_per_second": runners[name].trainer.recipe.train.batch_size / statistics.median(values)}
            for name, values in times.items()}


# ----------------------------------------------------------------------------------------------- data pipeline


class PILCifar(torch.utils.data.Dataset):
    """The common reference: what torchvision.datasets.CIFAR10 does per item (uint8 HWC array -> PIL image ->
    transforms), fed by DataLoader workers. (torchvision's class itself refuses re-exported CIFAR copies.)"""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def reference_loader(data, batch_size: int, workers: int = 2):
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.mean, data.std)])
    dataset = PILCifar(data.train_images, data.train_labels, transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=False, persistent_workers=workers > 0)


def pipeline_epoch_rates(recipe: Recipe, workers: Sequence[int] = (0, 2), epochs: int = 3) -> list[dict]:
    """Images per second of full training epochs (ce on the same model, same layout and precision):
    ipasdctl's pipeline, then the reference with each worker count, whole epochs alternating. One row each,
    with ipasdctl's rate divided by that row's (the ratio). Medians over the epochs: the first epoch of a
    reference with workers also pays for starting them."""
    import torch.nn.functional as F

    recipe = copy.deepcopy(recipe)
    recipe.method = {"name": "ce"}
    runner = StepRunner(recipe)
    t = runner.trainer

    def reference_epoch(loader) -> float:
        count, start = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
            if t.channels_last:  # the same layout as ours: the model is channels-last
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast(t.device, t.dtype):
                logits = t.model(x)
                loss = F.cross_entropy(logits, y)
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t.optimizer.step()
            count += y.numel()
        sync(t.device)
        return count / (time.perf_counter() - start)

    def ours_epoch(epoch: int) -> float:
        count, start = 0, time.perf_counter()
        for batch in t.loader.epoch(epoch):
            runner.step(batch)
            count += batch.labels.numel()
        sync(t.device)
        return count / (time.perf_counter() - start)

    loaders = {w: reference_loader(t.data, recipe.train.batch_size, w) for w in workers}
    ours: list[float] = []
    reference: dict[int, list[float]] = {w: [] for w in workers}
    for epoch in range(epochs):  # alternate whole epochs
        ours.append(ours_epoch(epoch))
        for w, loader in loaders.items():
            reference[w].append(reference_epoch(loader))
    ours_rate = statistics.median(ours)
    common = {"images": t.data.num_train, "precision": str(t.dtype).removeprefix("torch."),
              "channels_last": t.channels_last}
    rows = [{"pipeline": "ipasdctl", "workers": "-", "images_per_second": ours_rate, "ratio": 1.0, **common}]
    for w, rates in reference.items():
        rate = statistics.median(rates)
        rows.append({"pipeline": "torchvision+PIL", "workers": w, "images_per_second": rate,
                     "ratio": ours_rate / rate, **common})
    return rows


# ----------------------------------------------------------------------------------------------- memories


def memory_table_bytes(num_samples: int, num_classes: int, dtype: str, tables: int = 2) -> dict:
    per_entry = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return {"dtype": dtype, "bytes_per_sample_and_class_per_table": per_entry,
            "bytes_per_sample_and_class": per_entry * tables,
            "total_bytes": num_samples * num_classes * per_entry * tables}
