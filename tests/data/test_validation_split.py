"""data.val_split: a class-balanced validation split held out of the training set with its own seed; it
chooses the best epoch (best.pt), is recorded in splits.json and is the same in every run and resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.config import DataConfig, load_recipe
from ipasdctl.data import build_data
from ipasdctl.data.base import complement
from ipasdctl.data.digits import load_digits_data
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.studies import compare
from ipasdctl.studies import plan as planning
from ipasdctl.studies.summary import SUMMARY_COLUMNS, write_tables
from tests.helpers import metrics_without_timings


def pixel_keys(images: torch.Tensor) -> set[bytes]:
    return {bytes(image.flatten().tolist()) for image in images}


def test_the_split_is_class_balanced_disjoint_from_training_and_recorded():
    full = load_digits_data()
    data = build_data(DataConfig(val_split=100, val_seed=3))
    assert (data.num_val, data.num_train, data.num_test) == (100, full.num_train - 100, full.num_test)
    assert torch.bincount(data.val_labels, minlength=10).tolist() == [10] * 10
    indices = torch.tensor(data.origin["val_split"]["indices"])
    assert data.origin["val_split"]["size"] == 100 and data.origin["val_split"]["seed"] == 3
    # the recorded indices are the held-out images of the original training set, the rest is the training set
    assert torch.equal(data.val_images, full.train_images[indices])
    assert torch.equal(data.val_labels, full.train_labels[indices])
    assert torch.equal(data.train_images, full.train_images[complement(indices, full.num_train)])
    assert not pixel_keys(data.val_images) & pixel_keys(data.train_images)
    assert set(indices.tolist()).isdisjoint(complement(indices, full.num_train).tolist())


def test_the_split_has_its_own_seed_and_a_subset_keeps_its_size():
    a = build_data(DataConfig(val_split=50, val_seed=0, train_subset=200, subset_seed=0))
    b = build_data(DataConfig(val_split=50, val_seed=0, train_subset=200, subset_seed=1))
    c = build_data(DataConfig(val_split=50, val_seed=1, train_subset=200, subset_seed=0))
    assert a.num_train == 200 and a.num_val == 50  # held out first, then the subset drawn from the rest
    assert torch.equal(a.val_images, b.val_images)  # the subset's seed does not move the split
    assert not torch.equal(a.val_images, c.val_images)
    assert torch.equal(a.val_images, build_data(DataConfig(val_split=50, val_seed=0, train_subset=200)).val_images)
    assert not pixel_keys(a.val_images) & pixel_keys(a.train_images)


def test_file_data_sets_hold_out_training_files(tmp_path):
    from PIL import Image

    from ipasdctl.data.imagefolder import load_image_folder

    for c, name in enumerate(["a", "b"]):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i + c, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
        Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "val" / name / "0.png")
    data = load_image_folder(str(tmp_path), image_size=8, num_workers=0).hold_out_validation(4, seed=0)
    assert (data.num_train, data.num_val, data.num_test) == (6, 4, 2)
    assert set(data.val_files.tolist()).isdisjoint(data.train_files.tolist())
    assert torch.bincount(data.val_labels).tolist() == [2, 2]
    images = torch.cat([x for x, _ in data.held_out_batches("val", 3, "cpu")])
    labels = torch.cat([y for _, y in data.held_out_batches("val", 3, "cpu")])
    assert images.shape == (4, 3, 8, 8) and torch.equal(labels, data.val_labels)


def tiny_args(out, name, *extra):
    return ["train", "--recipe", "demo", "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--quiet",
            "--out", str(out), "--name", name, "--set", "data.train_subset=96", "--set", "data.val_split=60",
            "--set", "optim.warmup_epochs=0", "--set", "checkpoint.every_steps=2", *extra]



def test_the_best_epoch_is_chosen_on_the_split_and_test_accuracy_is_reported(tmp_path, one_thread, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path, "run"))
    assert exit_info.value.code == 0
    run_dir = tmp_path / "run"
    rows = metrics_without_timings(run_dir)
    val = [float(r["val_top1"]) for r in rows]
    best = val.index(max(val))  # the first epoch with the best validation top-1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_chosen_on"] == "val" and summary["val_images"] == 60
    assert summary["best_epoch"] == best + 1
    assert summary["best_top1"] == pytest.approx(float(rows[best]["test_top1"]), abs=1e-4)
    assert summary["best_val_top1"] == pytest.approx(max(val), abs=1e-4)
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] == best + 1
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["val_split"]["indices"] == build_data(load_recipe("demo", {"data": {"val_split": 60}}).data
                                                        ).origin["val_split"]["indices"]


def test_the_split_is_stable_across_resume(tmp_path, one_thread, monkeypatch, capsys):
    """A run interrupted mid-epoch and resumed ends with the metrics (validation columns too), best epoch and
    splits.json of the uninterrupted run."""
    noise = ("--set", "data.label_noise.rate=0.25")
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path, "ref", *noise))
    monkeypatch.setenv("IPASDCTL_TEST_SIGNAL_AT_STEP", "4:INT")
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path, "cut", *noise))
    assert exit_info.value.code == 130
    monkeypatch.delenv("IPASDCTL_TEST_SIGNAL_AT_STEP")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(tmp_path / "cut"), "--quiet"])
    assert exit_info.value.code == 0
    reference, resumed = tmp_path / "ref", tmp_path / "cut"
    assert metrics_without_timings(resumed) == metrics_without_timings(reference) and "val_top1" in metrics_without_timings(reference)[0]
    assert (resumed / "splits.json").read_text() == (reference / "splits.json").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (reference, resumed))
    for key in ("best_epoch", "best_top1", "best_val_top1", "last_top1", "label_noise_applied"):
        assert a[key] == b[key], key


def test_compare_summaries_say_which_split_chose_the_best_epoch(tmp_path, one_thread):
    overrides = {"train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
                 "data": {"train_subset": 64, "val_split": 40}}
    plan = planning.plan(load_recipe("demo", overrides), "", [0], tmp_path / "c")
    compare.run(plan, training.Progress(enabled=False), None)
    _, summary = write_tables(plan)
    assert summary["best_chosen_on"].tolist() == ["val", "val"]
    markdown = (tmp_path / "c" / "summary.md").read_text()
    assert "best top-1 on the validation split (40 training images held out" in markdown
    assert "optimistic" not in markdown
    table = pd.read_csv(tmp_path / "c" / "summary.csv")  # the same columns as the markdown, one seed: no verdict
    assert list(table.columns) == SUMMARY_COLUMNS and table["best_chosen_on"].tolist() == ["val", "val"]
    assert sorted(table["verdict_last_top1"]) == ["(reference)", "needs more seeds"]


def test_a_comparison_recorded_before_the_new_keys_is_rerun_not_refused(tmp_path, one_thread):
    """comparison.yaml and config.yaml written before data.val_split/val_seed/label_noise existed: the keys at
    their defaults are no difference, so the rerun skips the finished runs."""
    import yaml

    overrides = {"train": {"epochs": 1, "batch_size": 32, "device": "cpu"}, "data": {"train_subset": 64}}
    plan = planning.plan(load_recipe("demo", overrides), "", [0], tmp_path / "c")
    compare.run(plan, training.Progress(enabled=False), None)
    for path in [tmp_path / "c" / "comparison.yaml", *(tmp_path / "c").glob("*/config.yaml")]:
        record = yaml.safe_load(path.read_text())
        data = record["recipe"]["data"] if "recipe" in record else record["data"]
        for key in ("val_split", "val_seed", "label_noise"):
            data.pop(key)
        path.write_text(yaml.safe_dump(record, sort_keys=False))
    messages: list[str] = []
    compare.run(planning.plan(load_recipe("demo", overrides), "", [0], tmp_path / "c"),
                training.Progress(enabled=False), messages.append)
    assert len(messages) == 2 and all("finished, skipped" in m for m in messages)
