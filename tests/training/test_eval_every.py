"""Everyday-run savings: `train.eval_every` (test and validation passes every N epochs and at the last, the
other epochs' test cells empty, the best epoch chosen among the evaluated ones, exact resume kept) and
`data.test_subset` (a fixed, class-balanced part of the test set, the same for every seed, recorded)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.config import DataConfig
from ipasdctl.data import DATASETS, build_data, dataset_params
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.training import stopping
from ipasdctl.training import trainer as trainer_module
from tests.helpers import TIMING_COLUMNS, metrics_rows, metrics_without_timings, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def evaluated_every(epochs: int, eval_every: int, method: str = "ce", **data):
    """64 digits, batch 16: 4 steps an epoch; test (and validation) passes every `eval_every` epochs."""
    return tiny_recipe(method, epochs=epochs, batch_size=16, train={"eval_every": eval_every}, data=data)


def quiet() -> training.Progress:
    return training.Progress(enabled=False)



def counting_evaluations(monkeypatch) -> list[str]:
    """The splits of every test_metrics call the trainer makes, in order."""
    calls, real = [], trainer_module.test_metrics

    def counted(*args, **kwargs):
        calls.append(kwargs.get("split", "test"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "test_metrics", counted)
    return calls


def test_eval_every_evaluates_on_its_interval_and_at_the_last_epoch(tmp_path, monkeypatch):
    calls = counting_evaluations(monkeypatch)
    run = training.train(evaluated_every(epochs=5, eval_every=2), tmp_path / "every2", progress=quiet())
    assert calls == ["test"] * 3  # epochs 2, 4 and 5 (the last)
    rows = metrics_rows(run)
    evaluated = [row["epoch"] for row in rows if row["test_top1"] != ""]
    assert evaluated == ["2", "4", "5"]
    for row in rows:  # a skipped epoch's test cells are empty, never a stale value
        if row["epoch"] not in evaluated:
            assert row["test_loss"] == row["test_top1"] == row["test_top5"] == "", row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_every"] == 2 and summary["best_epoch"] in (2, 4, 5)
    assert summary["last_top1"] == pytest.approx(float(rows[-1]["test_top1"]), abs=1e-3)

    # skipping a test pass changes nothing in training: the train columns are those of an every-epoch run,
    # and the evaluated epochs' test figures too
    every = metrics_rows(training.train(evaluated_every(epochs=5, eval_every=1), tmp_path / "every1", progress=quiet()))
    for skipping, full in zip(rows, every):
        assert {k: v for k, v in skipping.items() if k not in TIMING_COLUMNS and not k.startswith("test_")} == \
            {k: v for k, v in full.items() if k not in TIMING_COLUMNS and not k.startswith("test_")}
        if skipping["epoch"] in evaluated:
            assert skipping["test_top1"] == full["test_top1"] and skipping["test_loss"] == full["test_loss"]


def test_the_validation_pass_follows_the_interval_and_chooses_the_best_among_evaluated_epochs(tmp_path, monkeypatch):
    calls = counting_evaluations(monkeypatch)
    run = training.train(evaluated_every(epochs=4, eval_every=3, val_split=40), tmp_path, progress=quiet())
    assert calls == ["test", "val", "test", "val"]  # epochs 3 and 4
    rows = metrics_rows(run)
    assert [row["val_top1"] != "" for row in rows] == [False, False, True, True]
    scores = {int(row["epoch"]): float(row["val_top1"]) for row in rows if row["val_top1"]}
    best_epoch = max(sorted(scores), key=lambda e: scores[e])  # the first epoch with the best validation top-1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == best_epoch and summary["best_chosen_on"] == "val"
    assert summary["best_top1"] == pytest.approx(float(rows[best_epoch - 1]["test_top1"]), abs=1e-3)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == best_epoch


def test_a_run_stopped_mid_epoch_with_eval_every_resumes_exactly_and_says_where(tmp_path, monkeypatch):
    recipe = lambda: evaluated_every(epochs=3, eval_every=2, method="ipasd")  # noqa: E731
    reference = training.train(recipe(), tmp_path / "reference", progress=quiet())
    monkeypatch.setenv(stopping.TEST_SIGNAL_ENV, "6:INT")  # after step 6: epoch 2, step 2 of 4
    with pytest.raises(training.Interrupted) as stopped:
        training.train(recipe(), tmp_path / "stopped", progress=quiet())
    monkeypatch.delenv(stopping.TEST_SIGNAL_ENV)
    stream = io.StringIO()
    training.resume(stopped.value.run_dir, progress=training.Progress(stream=stream))
    said = stream.getvalue().splitlines()
    assert said[0] == f"resuming {stopped.value.run_dir} at epoch 2/3, step 2/4 (6 steps done)"

    assert metrics_without_timings(stopped.value.run_dir) == metrics_without_timings(reference)
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(reference / "checkpoints" / name)
        b = load_checkpoint(stopped.value.run_dir / "checkpoints" / name)
        assert a["epoch"] == b["epoch"] and a["best"] == b["best"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------------------------------------ test subset


def test_the_test_subset_is_class_balanced_deterministic_and_recorded(tmp_path):
    whole = build_data(DataConfig(name="digits"))
    part = build_data(DataConfig(name="digits", test_subset=50))
    assert part.num_test == 50 and part.test_labels.bincount(minlength=10).tolist() == [5] * 10
    chosen = part.origin["test_subset"]["indices"]
    assert chosen == sorted(chosen) and len(set(chosen)) == 50
    assert torch.equal(part.test_labels, whole.test_labels[chosen])
    assert torch.equal(part.test_images, whole.test_images[chosen])
    # the same images whatever else the run changes (its seed, the training subset): comparisons stay paired
    other = build_data(DataConfig(name="digits", test_subset=50, train_subset=100, subset_seed=7))
    assert other.origin["test_subset"]["indices"] == chosen

    runs = []
    for seed in (0, 1):
        recipe = evaluated_every(epochs=1, eval_every=1, test_subset=30)
        recipe.train.seed = seed
        runs.append(training.train(recipe, tmp_path, progress=quiet()))
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["test_images"], summary["test_subset"]) == (30, 30)
    splits = [json.loads((run / "splits.json").read_text())["test_subset"] for run in runs]
    assert splits[0] == splits[1] and len(splits[0]["indices"]) == 30


def test_an_image_folder_takes_its_test_subset_by_file(tmp_path):
    for split, per_class in (("train", 3), ("val", 4)):
        for c, name in enumerate(("ant", "bee")):
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(per_class):
                pixels = np.full((8, 8, 3), 40 * c + 10 * k, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{k}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), test_subset=4,
                     params={"image_size": 8, "num_workers": 0})
    data = build_data(cfg)
    assert data.num_test == 4 and data.test_labels.tolist() == [0, 0, 1, 1]
    assert [f.decode().split("/")[0] for f in data.test_files] == ["ant", "ant", "bee", "bee"]
    (x, y), = list(data.test_batches(8, "cpu"))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    assert DATASETS.get("imagefolder")(cfg, dataset_params(cfg)).num_test == 8  # the data set itself is whole: build_data takes the part


@pytest.mark.parametrize("setting, expected", [
    ("train.eval_every=0", "train.eval_every must be a positive number of epochs, got 0"),
    ("data.test_subset=0", "data.test_subset must be a positive number of test images, got 0"),
    ("data.test_subset=5000", "data.test_subset=5000 is larger than the test set (359 images)"),
])
def test_bad_values_are_one_line_and_leave_no_run(setting, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "1", "--set", setting, "--out", str(tmp_path / "runs"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
