"""Shared fixtures: tiny data sets in the original CIFAR "python version" layout, written by the tests.

- `tiny_cifar`    : a folder holding cifar-10-batches-py/ (data_batch_1..5 of 40 images each, test_batch of
                    50, batches.meta), 200 training images of 32x32 in 10 classes. Pass it as --data.
- `tiny_cifar100` : a folder holding cifar-100-python/ (train of 200, test of 100, meta), 100 fine classes.
- `make_tiny_cifar`: the writer itself, `make_tiny_cifar(root, kind="cifar10", **sizes)`, for a test that
                    needs its own copy (to corrupt or change it).
- `demo_run`      : a finished 1-epoch run of the demo recipe (ipasd, resnet8, 64 digits), trained once for
                    the session and shared by the export, run-folder and hostile-input tests.

The folder fixtures are shared by the whole session: treat them as read-only (helpers.copy_run makes a
private copy to change or resume). The images are seeded
noise around a per-class colour, so a few epochs learn something and every run sees the same pixels.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch


def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 N x 3072 (R plane, G plane, B plane, each 32x32 row-major, as in the real files)."""
    base = (np.arange(num_classes)[:, None] * np.array([37, 91, 53]) + np.array([20, 60, 100])) % 200 + 28
    planes = base[labels][:, :, None] + rng.normal(0, 30, (labels.size, 3, 1024))
    return np.clip(planes, 0, 255).astype(np.uint8).reshape(labels.size, 3072)


def write_tiny_cifar(root: Path, kind: str = "cifar10", train: int = 200, test: int = 50, seed: int = 0,
                     num_classes: int | None = None) -> Path:
    """Write a CIFAR-format folder under `root` (pickle protocol 2, bytes keys, like the official files)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if kind == "cifar10":
        num_classes = num_classes or 10
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        labels = np.arange(train) % num_classes
        rng.shuffle(labels)
        images = _images(labels, num_classes, rng)
        for i, part in enumerate(np.array_split(np.arange(train), 5), start=1):
            batch = {b"batch_label": b"training batch %d of 5" % i, b"labels": labels[part].tolist(),
                     b"data": images[part], b"filenames": [b"img_%05d.png" % k for k in part]}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        test_labels = np.arange(test) % num_classes
        batch = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels.tolist(),
                 b"data": _images(test_labels, num_classes, rng), b"filenames": [b"t%d.png" % k for k in range(test)]}
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
        meta = {b"label_names": [b"class%d" % c for c in range(num_classes)], b"num_cases_per_batch": train // 5,
                b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    elif kind == "cifar100":
        num_classes = num_classes or 100
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, size in (("train", train), ("test", test)):
            labels = np.arange(size) % num_classes
            rng.shuffle(labels)
            batch = {b"filenames": [b"%s_%d.png" % (name.encode(), k) for k in range(size)],
                     b"batch_label": name.encode(), b"fine_labels": labels.tolist(),
                     b"coarse_labels": (labels // 5).tolist(), b"data": _images(labels, num_classes, rng)}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        meta = {b"fine_label_names": [b"fine%d" % c for c in range(num_classes)],
                b"coarse_label_names": [b"coarse%d" % c for c in range(num_classes // 5)]}
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    else:
        raise ValueError(kind)
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A read-only folder holding cifar-10-batches-py/ with 200 training and 50 test images, 10 classes."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar10"), "cifar10")


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory) -> Path:
    """A read-only folder holding cifar-100-python/ with 200 training and 100 test images, 100 classes."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar100"), "cifar100", train=200, test=100)


@pytest.fixture(scope="session")
def make_tiny_cifar():
    """The writer: make_tiny_cifar(root, kind='cifar10'|'cifar100', train=, test=, seed=, num_classes=)."""
    return write_tiny_cifar


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """A read-only finished 1-epoch demo run (ipasd, resnet8, 64 training digits, batch 64)."""
    from ipasdctl.config import load_recipe
    from ipasdctl.training import Progress, train

    recipe = load_recipe("demo", {"train": {"epochs": 1}, "data": {"train_subset": 64}})
    return train(recipe, tmp_path_factory.mktemp("demo_run"), progress=Progress(enabled=False))


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_process():
    """One intra-op thread for the whole session, here and in the processes the tests start (OMP_NUM_THREADS,
    unless a test sets its own): the tensors are tiny, and on a loaded 2-core machine OpenMP threads spinning
    at each operator's barrier made an in-process training up to 5x slower (a 3-run resume test: 13 s with
    torch's default 2 threads, 1.7 s with one). Tests of the thread options set and restore their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for this test even if an earlier one changed the count (see one_thread_per_process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
