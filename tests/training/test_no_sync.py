"""The training step issues no host synchronisation: no .item(), .cpu(), .tolist(), .numpy() or truth test of a
tensor. On CPU this is checked by construction: those calls are trapped while steps run."""

from __future__ import annotations

import pytest
import torch

from benchmarks.support import StepRunner, quick_recipe
from ipasdctl.methods import METHODS
TRAPPED = ("item", "cpu", "tolist", "numpy", "__bool__")


@pytest.mark.parametrize("method", [m for m in METHODS.names() if not METHODS.get(m).reference_run_param])  # need a teacher run
def test_training_step_never_reads_the_device(method, monkeypatch):
    runner = StepRunner(quick_recipe(method, dataset="digits", arch="resnet8", batch_size=32, train_subset=256))
    runner.prepare_epoch_one()
    calls = []
    for name in TRAPPED:
        original = getattr(torch.Tensor, name)

        def trap(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, trap)
    for _ in range(3):
        runner.step()
    monkeypatch.undo()
    assert calls == [], f"{method}'s step synchronised with the host: {sorted(set(calls))}"
