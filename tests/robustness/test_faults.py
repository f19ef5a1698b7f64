"""Faults and kills: a full disk, a failing fsync, SIGTERM or SIGKILL at a bad moment, non-finite losses, a run
folder deleted while it trains, killed exports' staging folders. Nothing is lost (best.pt, the previous file),
nothing half-written is left, and the run resumes exactly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path

import onnx
import pandas as pd
import pytest
import torch

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.errors import UserError
from ipasdctl.safe_io import atomic_write_text, load_checkpoint, save_checkpoint
from ipasdctl.runs import load_model
from ipasdctl.training import Progress, train
from tests.helpers import assert_no_run_folder, cli_error, copy_run, tiny_cifar_args, train_ok


def _fail_fsync_of(name: str, nth: int, monkeypatch):
    """Make the nth fsync of a temporary file of `name` (e.g. last.pt) fail with ENOSPC, inside ipasdctl.safe_io."""
    import ipasdctl.safe_io as io_module

    real_fsync, count = os.fsync, {"n": 0}

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(target).startswith(f".{name}."):
            count["n"] += 1
            if count["n"] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the file being written")
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny_cifar, tmp_path, monkeypatch, capsys):
    _fail_fsync_of("last.pt", 2, monkeypatch)  # every_steps=1: step 1's checkpoint is written, step 2's fails
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "1", "--name", "full", "--set", "checkpoint.every_steps=1"),
                   capsys)
    last = out / "full" / "checkpoints" / "last.pt"
    assert line == (f"error: cannot write {last}: No space left on device (the previous file is kept); "
                    "free disk space or choose another --out")
    assert load_checkpoint(last)["global_step"] == 1  # the previous checkpoint survived, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary file left
    assert not (out / "full" / ".lock").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the file being written")
def test_disk_full_at_the_first_checkpoint_leaves_no_run_folder(tiny_cifar, tmp_path, monkeypatch, capsys):
    _fail_fsync_of("last.pt", 1, monkeypatch)
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "1", "--name", "full", "--set", "checkpoint.every_steps=1"),
                   capsys)
    assert "No space left on device" in line
    assert_no_run_folder(out)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path, capsys):
    """lr=1e30: step 1 is finite and checkpointed (every_steps=1); its update makes step 2's loss NaN."""
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "2", "--lr", "1e30", "--name", "nan",
                             "--set", "checkpoint.every_steps=1"), capsys)
    last = out / "nan" / "checkpoints" / "last.pt"
    assert line == (f"error: non-finite loss at epoch 1, step 2 (loss=nan, loss_ce=nan); the last good checkpoint is "
                    f"kept in {last}; lower the lr, or set train.detect_anomaly=true to find the operation")
    state = load_checkpoint(last)
    assert state["global_step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                             if v.is_floating_point())
    assert not (out / "nan" / ".lock").exists()  # the lock is released: the folder can be resumed or removed


def test_non_finite_loss_before_any_checkpoint_leaves_no_run_folder(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "1", "--lr", "1e30"), capsys)
    assert "non-finite loss at epoch 1, step 2 (" in line and "no checkpoint had been written yet" in line
    assert_no_run_folder(out)
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.filterwarnings("ignore:Error detected in")
def test_detect_anomaly_names_the_operation_and_is_switched_off_after(tiny_cifar, tmp_path, monkeypatch):
    """train.detect_anomaly=true: autograd's anomaly mode raises in the backward of the op that made the NaN
    (a traceback is what one asks for here); the mode does not outlive the run."""
    monkeypatch.setenv("IPASDCTL_DEBUG", "1")
    with pytest.warns(UserWarning, match="Anomaly Detection has been enabled"):
        with pytest.raises(RuntimeError, match="returned nan values"):
            main(tiny_cifar_args(tiny_cifar, tmp_path / "runs", "--epochs", "1", "--lr", "1e30",
                           "--set", "train.detect_anomaly=true", "--set", "checkpoint.every_steps=1"))
    assert not torch.is_anomaly_enabled()
    assert load_checkpoint(next((tmp_path / "runs").iterdir()) / "checkpoints" / "last.pt")["global_step"] == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the file being written")
def test_disk_full_while_best_is_written_resumes_to_a_run_with_best(tiny_cifar, tmp_path, monkeypatch, capsys):
    """The epoch end writes best.pt before last.pt: a failure at best.pt leaves last.pt at the step before, so
    the resumed run repeats the epoch end and writes best.pt; it never says finished without it."""
    _fail_fsync_of("best.pt", 1, monkeypatch)
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "1", "--name", "r", "--set", "checkpoint.every_steps=1"),
                   capsys)
    run_dir = out / "r"
    assert f"cannot write {run_dir / 'checkpoints' / 'best.pt'}: No space left on device" in line
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 0  # not finished
    train_ok(["train", "--resume", str(run_dir), "--quiet"])  # the disk has room again
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True
    model, state, _ = load_model(run_dir, "best")
    assert state["epoch"] == 1


def test_a_finished_run_whose_best_is_missing_gets_it_back_on_resume(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "checkpoints" / "best.pt").unlink()
    training.resume(run_dir, None, training.Progress(enabled=False))
    best, last = (load_checkpoint(run_dir / "checkpoints" / f"{w}.pt") for w in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 1 and best["best"]["epoch"] == 1
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_a_best_epoch_whose_weights_are_gone_is_replaced_by_the_last_with_a_warning(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
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


def test_divergence_never_checkpoints_non_finite_batchnorm_statistics(tiny_cifar, tmp_path, capsys):
    """lr=1e6: the loss of a step can still be finite while the BatchNorm statistics its forward pass updated
    have overflowed; such weights are never written, so the last checkpoint evaluates."""
    out = tmp_path / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "2", "--lr", "1e6", "--name", "div",
                             "--set", "checkpoint.every_steps=1"), capsys)
    assert line.startswith("error: non-finite "), line
    last = out / "div" / "checkpoints" / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_stale_temporary_files_are_removed_on_the_next_start(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    stale = [run_dir / "checkpoints" / ".last.pt.k1ll3d.tmp", run_dir / ".metrics.csv.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    training.resume(run_dir, None, training.Progress(enabled=False))
    assert not any(p.exists() for p in stale)


def test_sigterm_during_the_test_pass_stops_there_and_resumes_exactly(tiny_cifar, tmp_path, monkeypatch, capsys):
    """A signal in the per-epoch test pass stops within a batch: the epoch's steps are checkpointed and the
    resumed run evaluates them; metrics.csv equals the uninterrupted run's (ipasd: its epoch-end update too)."""
    import ipasdctl.training.trainer as trainer_module

    args = ("--epochs", "2", "--method", "ipasd", "--set", "train.eval_batch_size=8")
    train_ok(tiny_cifar_args(tiny_cifar, tmp_path / "a", *args, "--name", "r"))
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
        main(tiny_cifar_args(tiny_cifar, tmp_path / "b", *args, "--name", "r"))
    assert exit_info.value.code == 143
    assert calls["batches"] == 2  # stopped at the check the signal came in, not at the end of the test set (7 batches)
    state = load_checkpoint(tmp_path / "b" / "r" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    monkeypatch.setattr(trainer_module, "test_metrics", real)
    train_ok(["train", "--resume", str(tmp_path / "b" / "r"), "--quiet"])
    columns = ["epoch", "train_loss", "test_loss", "test_top1"]
    expected = pd.read_csv(tmp_path / "a" / "r" / "metrics.csv")[columns]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b" / "r" / "metrics.csv")[columns], expected)


def test_write_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "epoch\n1\n")
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~runtime_umask())

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("ipasdctl.safe_io.os.fsync", no_space)
    with pytest.raises(UserError) as info:
        atomic_write_text(path, "epoch\n1\n2\n")
    assert str(info.value) == (f"cannot write {path}: No space left on device (the previous file is kept); "
                               "free disk space or choose another --out")
    assert path.read_text() == "epoch\n1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_a_kill_before_the_rename_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})

    def killed(src, dst):  # the process dies between the fsync and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("ipasdctl.safe_io.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_atomic_write_never_exposes_a_partial_file(tmp_path, monkeypatch):
    """While the new content is being written the path still holds the old file, whole."""
    import ipasdctl.safe_io as io_module

    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"old": true}\n')
    seen = []
    real_fsync = os.fsync

    def fsync_and_look(fd):
        seen.append(path.read_text())  # what a reader (or a crash) sees at this instant
        real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", fsync_and_look)
    atomic_write_text(path, '{"new": true}\n')
    assert seen[0] == '{"old": true}\n' and path.read_text() == '{"new": true}\n'


def runtime_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_export_removes_the_staging_folders_killed_exports_left_and_keeps_a_live_ones(demo_run, tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    name = demo_run.name
    dead = out / f".{name}.k1lled00.tmp"
    (dead / "sub").mkdir(parents=True)
    (dead / f"{name}-int8.onnx").write_bytes(b"half")
    live = out / f".{name}.l1ve0000.tmp"
    live.mkdir()
    other = out / ".another-model.k1lled00.tmp"  # another export's leftovers: not this export's to judge
    other.mkdir()
    for folder in (dead, live, other):
        os.utime(folder, (time.time() - 3600, time.time() - 3600))
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running export holds its staging folder
    try:
        from ipasdctl.deploy.export import export_onnx

        export_onnx(demo_run, out, validation_batch_sizes=(1,))
    finally:
        os.close(held)
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{name}.json", f"{name}.onnx"]


def test_a_full_disk_during_int8_says_so(demo_run, tmp_path, monkeypatch, capsys):
    """quant_pre_process writes its model from C++: on a full disk the file ends short and onnx then reports
    "Wire format was corrupt"; the disk (here: reported full by statvfs) is the cause, and is named."""
    import onnxruntime.quantization.shape_inference as shape_inference

    import ipasdctl.safe_io as files_module

    out = tmp_path / "exports"

    def short_write(source, target, **_):
        Path(target).write_bytes(Path(source).read_bytes()[:100])  # what fitted on the disk

    real_statvfs = os.statvfs

    class Full:
        def __init__(self, real):
            self.f_frsize, self.f_bavail = real.f_frsize, 0

    monkeypatch.setattr(shape_inference, "quant_pre_process", short_write)
    monkeypatch.setattr(files_module.os, "statvfs",
                        lambda p: Full(real_statvfs(p)) if str(p).startswith(str(out)) else real_statvfs(p))
    line = cli_error(["export", str(demo_run), "--onnx", "--int8", "--calib-samples", "16", "--out", str(out)], capsys)
    assert f"cannot write into {out}: No space left on device (0 kB free" in line
    assert "free disk space or choose another --out" in line
    assert list(out.iterdir()) == []  # nothing half-written, no staging folder


@pytest.mark.parametrize("removed", ["folder", "lock"])
def test_a_run_folder_deleted_while_it_trains_stops_the_run_and_is_not_recreated(removed, tiny_cifar, tmp_path,
                                                                                 monkeypatch, capsys):
    out, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    real_epoch_line = Progress.epoch_line

    def epoch_line_then_remove(self, bar, row, epochs):
        real_epoch_line(self, bar, row, epochs)
        if row["epoch"] == 1:  # after epoch 1's checkpoint and metrics.csv
            if removed == "folder":
                shutil.rmtree(run_dir)
            else:
                (run_dir / ".lock").unlink()

    monkeypatch.setattr(Progress, "epoch_line", epoch_line_then_remove)
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "2", "--name", "r"), capsys)
    assert f"run folder {run_dir} vanished while the run trained (its config.yaml or .lock is gone)" in line
    if removed == "folder":
        assert not run_dir.exists()  # no half folder: no metrics.csv or checkpoints without config.yaml
        return
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # the header and epoch 1: whole
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").exists()
    monkeypatch.setattr(Progress, "epoch_line", real_epoch_line)
    with pytest.raises(SystemExit) as exit_info:
        from ipasdctl.cli import main

        main(["train", "--resume", str(run_dir), "--quiet"])
    assert exit_info.value.code == 0
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True
