"""`ipasdctl tune`: a tiny study writes its files and a rerun adds nothing; a SIGKILLed trial is re-run from its
checkpoint; the pruner stops a hopeless trial; `compare --tuned` trains with the study's parameters; bad input.

Trials are tiny: the embedded digits cut to 64 training images (32 held out for validation), ResNet-8, batch 32.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.cli.options import recipe_overrides
from ipasdctl.config import load_recipe
from ipasdctl.runs import RunFolder, StudyFolder
from ipasdctl.studies import compare, plan as planning, trial as trials, tune as tuning, tuned as tuned_runs
from ipasdctl.training import stopping

pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parents[2]
TINY = ["--recipe", "demo", "--method", "ce", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
        "--set", "data.train_subset=64", "--set", "data.val_split=32", "-q"]


def tiny_recipe(epochs=1, method="ce", *sets):
    overrides = recipe_overrides({"epochs": epochs, "batch_size": 32, "device": "cpu", "method": method,
                                  "set_": ["data.train_subset=64", "data.val_split=32", *sets]})
    return training.resolve_recipe(load_recipe("demo", overrides))


def read_trials(folder: Path) -> list[dict]:
    with StudyFolder(folder).trials.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    tuning.run(tiny_recipe(), tuning.TuneSettings(trials=3, out=out), progress_enabled=False)
    return out


def test_a_three_trial_study_writes_its_files_and_a_rerun_adds_no_trial(study):
    folder = StudyFolder(study)
    rows = read_trials(study)
    assert [r["state"] for r in rows] == ["complete"] * 3
    assert {"optim.lr", "optim.weight_decay"} <= set(rows[0])  # ce declares nothing: the optimiser's two keys
    for row in rows:  # each trial is a run folder trained with its own parameters, scored on the val split
        run = RunFolder(study / row["run"])
        config = run.read_config()
        assert config["optim"]["lr"] == pytest.approx(float(row["optim.lr"]))
        assert run.read_summary().best_val_top1 == pytest.approx(float(row["val_top1"]))
        assert int(row["epochs"]) == 1
    best = max(rows, key=lambda r: float(r["val_top1"]))
    overrides = yaml.safe_load(folder.best.read_text())
    assert overrides["method"] == {"name": "ce"}
    assert overrides["optim"]["lr"] == pytest.approx(float(best["optim.lr"]))
    assert (folder.plots / "optimization_history.png").stat().st_size > 0
    assert "Best: trial" in folder.summary_markdown.read_text()
    assert folder.database.is_file()

    times = {p: p.stat().st_mtime_ns for p in study.rglob("*.pt")}
    messages: list[str] = []
    tuning.run(tiny_recipe(), tuning.TuneSettings(trials=3, out=study), progress_enabled=False, say=messages.append)
    assert len(read_trials(study)) == 3
    assert {p: p.stat().st_mtime_ns for p in study.rglob("*.pt")} == times  # nothing trained again
    assert any("nothing to run" in m for m in messages)


def test_a_killed_trial_is_re_run_from_its_checkpoint(tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "ipasdctl", "tune", "--trials", "2", *TINY, "--epochs", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), stopping.TEST_SIGNAL_ENV: "3:KILL"}  # trial 0, epoch 2 (2 steps an epoch)
    killed = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    assert RunFolder(out / "trial-0000").state() == "resumable"
    env.pop(stopping.TEST_SIGNAL_ENV)
    rerun = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_trials(out)
    assert [(r["trial"], r["state"], r["run"]) for r in rows] == [
        ("0", "fail", "trial-0000"), ("1", "complete", "trial-0000"), ("2", "complete", "trial-0002")]
    assert rows[0]["note"] == "re-run as trial 1" and rows[1]["note"] == "re-run of trial 0"
    assert rows[0]["optim.lr"] == rows[1]["optim.lr"]  # the same parameters, resumed in the same folder
    assert RunFolder(out / "trial-0000").read_summary().finished
    assert int(rows[1]["epochs"]) == 2


def test_the_pruner_stops_a_trial_a_stubbed_objective_makes_hopeless(tmp_path, monkeypatch):
    def stubbed(recipe, folder, progress):
        value = 1.0 if folder.name == "trial-0002" else 90.0
        for epoch in (1, 2, 3):
            progress.epoch_finished({"epoch": epoch, "val_top1": value})
        return value

    monkeypatch.setattr(trials, "train_trial", stubbed)
    out = tmp_path / "s"
    settings = tuning.TuneSettings(trials=3, out=out, startup_trials=2, warmup_epochs=0)
    tuning.run(tiny_recipe(3), settings, progress_enabled=False)
    rows = read_trials(out)
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert rows[2]["epochs"] == "1" and rows[2]["note"] == "pruned at epoch 1"
    assert "pruned" in StudyFolder(out).summary_markdown.read_text()


@pytest.mark.parametrize("epochs, lr_warmup, pruned_at", [(9, 1, 3), (6, 4, 5), (3, 0, 1)])
def test_by_default_the_pruner_judges_a_trial_from_a_third_of_its_epochs_and_past_the_lr_warm_up(
        epochs, lr_warmup, pruned_at, tmp_path, monkeypatch):
    def stubbed(recipe, folder, progress):
        value = 1.0 if folder.name == "trial-0002" else 90.0  # hopeless from its first epoch
        for epoch in range(1, recipe.train.epochs + 1):
            progress.epoch_finished({"epoch": epoch, "val_top1": value})
        return value

    monkeypatch.setattr(trials, "train_trial", stubbed)
    out = tmp_path / "s"
    settings = tuning.TuneSettings(trials=3, out=out, startup_trials=2)
    recipe = tiny_recipe(epochs, "ce", f"optim.warmup_epochs={lr_warmup}")
    assert settings.warmup_for(recipe) == pruned_at
    tuning.run(recipe, settings, progress_enabled=False)
    rows = read_trials(out)
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert rows[2]["note"] == f"pruned at epoch {pruned_at}"
    assert tuning.TuneSettings(trials=3, warmup_epochs=0).warmup_for(recipe) == 0  # an explicit value wins


def test_compare_tuned_trains_with_the_study_parameters(study, tmp_path):
    best = yaml.safe_load(StudyFolder(study).best.read_text())
    comparison = planning.plan(tiny_recipe(), "", [0], tmp_path / "c", tuned_runs.read_tuned([study]))
    compare.run(comparison, training.Progress(enabled=False), None)
    config = RunFolder(tmp_path / "c" / "ce-s0").read_config()
    assert config["optim"]["lr"] == best["optim"]["lr"]
    assert config["optim"]["weight_decay"] == best["optim"]["weight_decay"]
    assert f"(tuned: best trial of study {study})" in comparison.folder.summary_markdown.read_text()


@pytest.mark.parametrize("space, expected", [
    ({"optim.lr": [0.1, 0.1]}, "optim.lr's range [0.1, 0.1] is empty"),
    ({"optim.lr": [0.5, 0.01]}, "optim.lr's range [0.5, 0.01] is inverted"),
    ({"method.alpha_T": [0.1, 0.9]}, "'method.alpha_T' is a parameter of ps-kd, not of ipasd"),
    ({"method.w_dvi": [0.1, 0.9]}, "unknown key 'method.w_dvi' (did you mean 'method.w_div'?)"),
    ({"method.w_div": [-1, 0.5]}, "method.w_div must not be negative, got -1"),
    ({"optim.lr": {"low": 0, "high": 1, "log": True}}, "log-scale range must be positive"),
])
def test_a_bad_space_is_one_line(tmp_path, capsys, space, expected):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    args = ["tune", "--trials", "2", *TINY, "--method", "ipasd", "--space", str(path), "--out", str(tmp_path / "s")]
    code, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "s").exists()


def test_bad_input_is_one_line(tmp_path, capsys, study):
    cases = [
        (["--trials", "0", *TINY], "--trials must be a positive integer, got 0"),
        (["--trials", "2", *TINY[:-5], "-q"], "tune needs a validation split"),
        (["--trials", "2", *TINY, "--storage", "sqlite:////no/such/folder/x.db"], "cannot open the study storage"),
        (["--trials", "2", *TINY, "--storage", "nodb://x"], "cannot open the study storage nodb://x"),
        (["--trials", "3", *TINY, "--method", "ipasd", "--out", str(study)], "holds a study of method ce, not ipasd"),
        (["--trials", "3", *TINY, "--lr", "0.2", "--out", str(study)], "holds a study of another recipe (differs in "
                                                                      "optim.lr)"),
    ]
    for args, expected in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "fresh")]
        code, err = run_cli(["tune", *args], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (args, err)
    assert not (tmp_path / "fresh").exists()
    assert len(read_trials(study)) == 3  # a refused rerun left the study as it was


def test_tune_chains_into_compare_which_runs_the_study_parameters(tmp_path, capsys):
    study, comparison = tmp_path / "s", tmp_path / "c"
    args = ["tune", "--trials", "1", *TINY, "--out", str(study),
            "compare", *TINY, "--seeds", "0", "--out", str(comparison)]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    best = yaml.safe_load(StudyFolder(study).best.read_text())
    assert RunFolder(comparison / "ce-s0").read_config()["optim"]["lr"] == best["optim"]["lr"]


def test_a_missing_optuna_and_a_folder_that_is_no_study_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code, err = run_cli(["tune", "--trials", "2", *TINY, "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and err == f"error: {tuning.TUNE_MISSING}\n"
    (tmp_path / "plain").mkdir()
    code, err = run_cli(["compare", *TINY, "--seeds", "0", "--tuned", str(tmp_path / "plain"), "--out",
                         str(tmp_path / "c")], capsys)
    assert code == 2 and "is not a study folder (no study.yaml)" in err and err.count("\n") == 1


def test_compare_tune_tunes_every_method_with_the_same_budget_then_compares(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["compare", *TINY, "--method", "ls", "--seeds", "0", "--tune", "2", "--out", str(out)]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    for method in ("ce", "ls"):
        rows = read_trials(out / "tuning" / method)
        assert [r["state"] for r in rows] == ["complete", "complete"]
        best = yaml.safe_load((out / "tuning" / method / "best.yaml").read_text())
        config = RunFolder(out / f"{method}-s0").read_config()
        assert config["optim"]["lr"] == best["optim"]["lr"]
        if method == "ls":  # its declared parameter was searched too
            assert config["method"]["eps"] == best["method"]["eps"]
    times = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    code, err = run_cli(args, capsys)  # a rerun: no trial, no run trained again
    assert code == 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == times
    code, err = run_cli([*args, "--tuned", str(out / "tuning" / "ce")], capsys)
    assert code == 2 and "leave out --tuned" in err
