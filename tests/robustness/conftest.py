"""The finished runs the hostile-input tests share, trained once a session: copy one (helpers.copy_run)
before changing or resuming it."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_cifar_args, train_ok


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_cifar):
    """A finished 1-epoch run named `run` on the shared tiny CIFAR-10 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished")
    train_ok(tiny_cifar_args(tiny_cifar, out, "--epochs", "1", "--name", "run"))
    return out / "run"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, make_tiny_cifar):
    """(run folder, data root): a finished 1-epoch run on its own tiny CIFAR copy (40 training, 10 test
    images); a test may change that data, never the run folder."""
    base = tmp_path_factory.mktemp("finished_own_data")
    root = make_tiny_cifar(base / "data", train=40, test=10)
    train_ok(tiny_cifar_args(root, base / "runs", "--epochs", "1", "--name", "run"))
    return base / "runs" / "run", root
