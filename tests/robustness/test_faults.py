"""Issue 19, "nothing lost, nothing mixed, nothing hangs": each failure an adversarial user found, reproduced.

Runs are tiny (32 CIFAR images, batch 16, resnet8: two steps an epoch); bad input is one line and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pandas as pd
import pytest
import torch
import yaml

from ipasdctl import training
from ipasdctl.analysis.collect import collect_runs
from ipasdctl.cli import main
from ipasdctl.config import parse_set
from ipasdctl.files import load_checkpoint, save_checkpoint
from ipasdctl.runs import load_model
from test_bad_input import _fail_fsync_of, assert_no_run_folder, run_cli, snapshot, tiny_args


def train_ok(args) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_cifar):
    """A finished 1-epoch run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished")
    train_ok(tiny_args(tiny_cifar, out, "--epochs", "1", "--name", "run"))
    return out / "run"


def copy_of(run_dir, tmp_path):
    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(".lock"))
    return target


# ---------------------------------------------------------------------------------------- 1. best.pt is never lost


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the file being written")
def test_disk_full_while_best_is_written_resumes_to_a_run_with_best(tiny_cifar, tmp_path, monkeypatch, capsys):
    """The epoch end writes best.pt before last.pt: a failure at best.pt leaves last.pt at the step before, so
    the resumed run repeats the epoch end and writes best.pt; it never says finished without it."""
    _fail_fsync_of("best.pt", 1, monkeypatch)
    out = tmp_path / "runs"
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "1", "--name", "r", "--set", "checkpoint.every_steps=1"),
                   capsys)
    run_dir = out / "r"
    assert f"cannot write {run_dir / 'checkpoints' / 'best.pt'}: No space left on device" in line
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 0  # not finished
    train_ok(["train", "--resume", str(run_dir), "--quiet"])  # the disk has room again
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True
    model, state, _ = load_model(run_dir, "best")
    assert state["epoch"] == 1


def test_a_finished_run_whose_best_is_missing_gets_it_back_on_resume(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "checkpoints" / "best.pt").unlink()
    training.resume(run_dir, None, training.Progress(enabled=False))
    best, last = (load_checkpoint(run_dir / "checkpoints" / f"{w}.pt") for w in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 1 and best["best"]["epoch"] == 1
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_a_best_epoch_whose_weights_are_gone_is_replaced_by_the_last_with_a_warning(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["best"] = {"top1": 99.0, "epoch": 0, "top5": 99.0}  # as if an earlier epoch had been the best
    save_checkpoint(last, state)
    (run_dir / "checkpoints" / "best.pt").unlink()
    training.resume(run_dir, None, training.Progress(enabled=False))
    err = capsys.readouterr().err
    assert "best.pt was missing and epoch 0's weights are gone; best.pt now holds the last epoch (1," in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["best_top1"] == summary["last_top1"]
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["best"]["epoch"] == 1


# ---------------------------------------------------------------------------------------- 2. report of a moved comparison


def fake_comparison(folder, top1: float):
    """A comparison folder as `compare` writes it (absolute run_dir in results.csv), with one ce run."""
    run_dir = folder / "ce-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "ce"}, "train": {"seed": 0}}))
    row = {"method": "ce", "seed": 0, "arch": "resnet8", "dataset": "cifar10", "epochs": 1, "best_top1": top1,
           "last_top1": top1, "best_epoch": 1, "run_dir": str(run_dir.resolve())}
    pd.DataFrame([row]).to_csv(folder / "results.csv", index=False)


def test_report_of_a_renamed_comparison_reads_its_own_runs(tmp_path, capsys):
    old, moved = tmp_path / "cmp", tmp_path / "cmp-old"
    fake_comparison(old, 11.0)
    old.rename(moved)
    fake_comparison(old, 99.0)  # a new comparison at the old path
    runs, _ = collect_runs([moved])
    assert [r.run_dir for r in runs] == [moved / "ce-s0"] and runs[0].row["best_top1"] == 11.0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and str(old.resolve() / "ce-s0") in warning[0] and "outside this comparison" in warning[0]
    runs, _ = collect_runs([moved, old])  # both: two runs, not one evaluated twice
    assert sorted(r.row["best_top1"] for r in runs) == [11.0, 99.0]


def test_a_row_pointing_elsewhere_without_a_run_here_is_left_out_with_one_warning(tmp_path, capsys):
    elsewhere, cmp = tmp_path / "elsewhere", tmp_path / "cmp"
    fake_comparison(elsewhere, 50.0)
    cmp.mkdir()
    shutil.copy(elsewhere / "results.csv", cmp / "results.csv")
    runs, _ = collect_runs([cmp])
    assert runs == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside this comparison; it is left out of the report" in err[0]


# ---------------------------------------------------------------------------------------- 3. an empty test split


def test_an_empty_cifar_test_split_is_refused_before_training(make_tiny_cifar, tmp_path, capsys):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=0)
    out = tmp_path / "runs"
    line = run_cli(tiny_args(root, out, "--epochs", "1"), capsys)
    assert "data set 'cifar10' has no test images (its test split is empty" in line
    assert_no_run_folder(out)


def test_an_image_folder_with_empty_val_classes_is_refused(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        (tmp_path / "data" / "val" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / "train" / cls / f"{i}.png")
    out = tmp_path / "runs"
    line = run_cli(["train", "--dataset", "imagefolder", "--data", str(tmp_path / "data"), "--arch", "resnet8",
                    "--method", "ce", "--batch-size", "4", "--device", "cpu", "--quiet", "--out", str(out),
                    "--epochs", "1", "--set", "data.image_size=8", "--set", "data.num_workers=0"], capsys)
    assert "data set 'imagefolder' has no test images" in line
    assert_no_run_folder(out)


# ---------------------------------------------------------------------------------------- 4. the last good checkpoint


def test_divergence_never_checkpoints_non_finite_batchnorm_statistics(tiny_cifar, tmp_path, capsys):
    """lr=1e6: the loss of a step can still be finite while the BatchNorm statistics its forward pass updated
    have overflowed; such weights are never written, so the last checkpoint evaluates."""
    out = tmp_path / "runs"
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "2", "--lr", "1e6", "--name", "div",
                             "--set", "checkpoint.every_steps=1"), capsys)
    assert line.startswith("error: non-finite "), line
    last = out / "div" / "checkpoints" / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_checkpoint_with_nan_weights_is_one_line_for_eval_and_export(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    path = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(path)
    state["model"][next(k for k, v in state["model"].items() if v.is_floating_point())].fill_(float("nan"))
    save_checkpoint(path, state)
    assert "holds non-finite weights" in run_cli(["eval", str(run_dir), "--device", "cpu"], capsys)
    assert "holds non-finite weights" in run_cli(["export", str(run_dir), "--onnx", "--out", str(tmp_path / "x")],
                                                 capsys)


# ---------------------------------------------------------------------------------------- 5. the checkpoint's recipe is the truth


def test_resume_with_a_corrupt_config_yaml_is_one_line_and_keeps_the_run(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "config.yaml").write_text("train: [unclosed\n")
    before = snapshot(run_dir)
    for extra in ([], ["--set", "optim.lr=0.2"]):
        line = run_cli(["train", "--resume", str(run_dir), *extra], capsys)
        assert "its config.yaml is not readable YAML" in line and "remove config.yaml" in line
    assert snapshot(run_dir) == before
    # the options are compared with the checkpoint's recipe, not swallowed with the unreadable config.yaml
    given = training.resume_recipe(run_dir, None, parse_set(["optim.lr=0.2"]))
    assert given is not None and given.optim.lr == 0.2
    (run_dir / "config.yaml").unlink()  # as the line says: resume writes it again from the checkpoint
    training.resume(run_dir, None, training.Progress(enabled=False))
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]


def test_resume_with_a_hand_edited_config_yaml_names_the_keys(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["optim"]["lr"] = 0.2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(run_dir)
    line = run_cli(["train", "--resume", str(run_dir)], capsys)
    assert "config.yaml disagrees with the recipe in checkpoints/last.pt (optim.lr)" in line
    assert snapshot(run_dir) == before


def test_resume_with_a_checkpoint_copied_from_another_arch_is_refused(finished, tiny_cifar, tmp_path, capsys):
    other_out = tmp_path / "other"
    train_ok(tiny_args(tiny_cifar, other_out, "--epochs", "1", "--arch", "resnet20", "--name", "o",
                       "--set", "data.train_subset=16"))
    run_dir = copy_of(finished, tmp_path)
    shutil.copy(other_out / "o" / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt")
    before = snapshot(run_dir)
    line = run_cli(["train", "--resume", str(run_dir)], capsys)
    assert "config.yaml disagrees with the recipe in checkpoints/last.pt (" in line and "model.arch" in line
    assert snapshot(run_dir) == before


def test_resume_with_metrics_ahead_of_the_checkpoint_is_refused(finished, tmp_path, capsys):
    """A last.pt older than the run (copied back from elsewhere) would rewrite metrics.csv shorter."""
    run_dir = copy_of(finished, tmp_path)
    metrics = run_dir / "metrics.csv"
    metrics.write_text(metrics.read_text() + metrics.read_text().splitlines()[-1] + "\n")
    before = snapshot(run_dir)
    line = run_cli(["train", "--resume", str(run_dir)], capsys)
    assert "metrics.csv records 2 epochs but checkpoints/last.pt only 1" in line
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------- 6 and 9: small ones


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/ipasdctl-absolute-name", "..", "a/b"])
def test_train_name_must_be_a_plain_folder_name(name, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "deep" / "runs"
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "1", "--name", name), capsys)
    assert f"--name {name!r} must be a plain folder name" in line
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/tmp/ipasdctl-absolute-name")
    assert_no_run_folder(out)


def test_stale_temporary_files_are_removed_on_the_next_start(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    stale = [run_dir / "checkpoints" / ".last.pt.k1ll3d.tmp", run_dir / ".metrics.csv.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    training.resume(run_dir, None, training.Progress(enabled=False))
    assert not any(p.exists() for p in stale)


def test_eval_of_a_folder_named_like_a_model_says_what_it_is(tmp_path, capsys):
    (tmp_path / "dir.onnx").mkdir()
    line = run_cli(["eval", str(tmp_path / "dir.onnx")], capsys)
    assert "is a folder, not a file" in line and "does not exist" not in line


def test_eval_of_a_read_only_run_folder_suggests_no_option_eval_lacks(finished, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(finished, tmp_path)
    real_access = os.access
    monkeypatch.setattr("ipasdctl.analysis.evaluation.os.access",
                        lambda path, mode: False if os.path.samefile(path, run_dir) and mode & os.W_OK
                        else real_access(path, mode))
    line = run_cli(["eval", str(run_dir), "--device", "cpu"], capsys)
    assert f"{run_dir} is not writable" in line and "--out" not in line


def test_sigterm_during_the_test_pass_stops_there_and_resumes_exactly(tiny_cifar, tmp_path, monkeypatch, capsys):
    """A signal in the per-epoch test pass stops within a batch: the epoch's steps are checkpointed and the
    resumed run evaluates them; metrics.csv equals the uninterrupted run's (ipasd: its epoch-end update too)."""
    import ipasdctl.training.trainer as trainer_module

    args = ("--epochs", "2", "--method", "ipasd", "--set", "train.eval_batch_size=8")
    train_ok(tiny_args(tiny_cifar, tmp_path / "a", *args, "--name", "r"))
    real, calls = trainer_module.test_metrics, {"n": 0, "batches": 0}

    def signalled_test_metrics(*a, stop=None, **k):
        calls["n"] += 1

        def stop_after_one_batch():
            calls["batches"] += 1
            if calls["n"] == 1 and calls["batches"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return stop()
        return real(*a, stop=stop_after_one_batch, **k)

    monkeypatch.setattr(trainer_module, "test_metrics", signalled_test_metrics)
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tiny_cifar, tmp_path / "b", *args, "--name", "r"))
    assert exit_info.value.code == 143
    assert calls["batches"] == 2  # stopped at the check the signal came in, not at the end of the test set (7 batches)
    state = load_checkpoint(tmp_path / "b" / "r" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    monkeypatch.setattr(trainer_module, "test_metrics", real)
    train_ok(["train", "--resume", str(tmp_path / "b" / "r"), "--quiet"])
    columns = ["epoch", "train_loss", "test_loss", "test_top1"]
    expected = pd.read_csv(tmp_path / "a" / "r" / "metrics.csv")[columns]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b" / "r" / "metrics.csv")[columns], expected)
