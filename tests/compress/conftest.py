"""Pruned runs shared by the compress tests: the session's demo run (resnet8) pruned to half its MACs, and a
tiny wide ResNet trained for it and pruned the same way. Read-only, as the fixtures of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

PRUNE = {"target_macs": 0.5, "epochs": 1, "overrides": {"train": {"batch_size": 32, "device": "cpu"}}}


def prune(run: Path, out: Path, **settings) -> Path:
    from ipasdctl.compress import PruneSettings, prune_run

    return prune_run(run, PruneSettings(**{**PRUNE, **settings}), out=out)


@pytest.fixture(scope="session")
def wrn_run(tmp_path_factory) -> Path:
    """wrn16_2 trained with ce for one epoch on 32 digits."""
    from tests.helpers import tiny_recipe
    from ipasdctl.training import Progress, train

    recipe = tiny_recipe("ce", subset=32, model={"arch": "wrn16_2"})
    return train(recipe, tmp_path_factory.mktemp("wrn_run"), progress=Progress(enabled=False))


@pytest.fixture(scope="session")
def pruned_demo(demo_run, tmp_path_factory) -> Path:
    """The demo run (ipasd, resnet8) pruned to half its MACs by magnitude, recovered for one epoch."""
    return prune(demo_run, tmp_path_factory.mktemp("pruned_demo"))


@pytest.fixture(scope="session")
def pruned_wrn(wrn_run, tmp_path_factory) -> Path:
    return prune(wrn_run, tmp_path_factory.mktemp("pruned_wrn"))
