"""data.label_noise: exactly round(rate * N) training labels flipped, of the stated kind, seeded; validation and
test labels never touched; the applied rate printed and stored."""

from __future__ import annotations

import json

import pytest
import torch

from ipasdctl.cli import main
from ipasdctl.config import DataConfig, LabelNoiseConfig
from ipasdctl.data import build_data
from ipasdctl.data.noise import noisy_labels


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.333])
@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_exactly_the_stated_fraction_is_flipped_with_the_stated_kind(rate, kind):
    labels = torch.arange(1000) % 10
    noisy = noisy_labels(labels, 10, rate, kind, seed=0)
    flipped = noisy != labels
    assert int(flipped.sum()) == round(rate * 1000)
    assert noisy.min() >= 0 and noisy.max() <= 9 and noisy.dtype == labels.dtype
    if kind == "pairflip":
        assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 10)
    elif rate >= 0.2:  # symmetric: every other class is reached, about equally often (200+ flips over 9 classes)
        offsets = torch.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
        assert offsets[0] == 0 and bool((offsets[1:] > 0).all())
        assert offsets[1:].max() < 3 * offsets[1:].min()
    assert torch.equal(noisy, noisy_labels(labels, 10, rate, kind, seed=0))  # seeded
    if rate > 0:
        assert not torch.equal(noisy, noisy_labels(labels, 10, rate, kind, seed=1))


def test_noise_touches_training_labels_only():
    clean = build_data(DataConfig(val_split=100))
    noisy = build_data(DataConfig(val_split=100, label_noise=LabelNoiseConfig(rate=0.4, kind="symmetric", seed=5)))
    assert torch.equal(noisy.test_labels, clean.test_labels)
    assert torch.equal(noisy.val_labels, clean.val_labels)  # held out before the noise
    assert torch.equal(noisy.train_images, clean.train_images)
    flipped = int((noisy.train_labels != clean.train_labels).sum())
    assert flipped == round(0.4 * clean.num_train)
    record = noisy.origin["label_noise"]
    assert record == {"rate": 0.4, "kind": "symmetric", "seed": 5, "flipped": flipped,
                      "train_images": clean.num_train, "applied_rate": flipped / clean.num_train}


def test_the_applied_rate_is_printed_and_stored(tmp_path, one_thread, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path), "--name",
              "noisy", "--set", "data.train_subset=64", "--set", "data.label_noise.rate=0.25",
              "--set", "data.label_noise.kind=pairflip"])
    assert exit_info.value.code == 0
    assert "label noise: 16 of 64 training labels flipped (25.00 %, pairflip, seed 0)" in capsys.readouterr().err
    run_dir = tmp_path / "noisy"
    assert json.loads((run_dir / "splits.json").read_text())["label_noise"]["flipped"] == 16
    assert json.loads((run_dir / "summary.json").read_text())["label_noise_applied"] == 0.25
