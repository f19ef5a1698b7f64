"""The bad-input catalogue of docs/errors.md, one test per row.

Every row: `ipasdctl train ...` exits with code 2 and one line on stderr ("error: what is wrong; how to fix
it"), no traceback, and no run folder left behind (a run folder that existed before is left as it was).
IPASDCTL_DEBUG=1 turns the line into the exception itself (a traceback).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil

import pytest
import torch

from ipasdctl.cli import main
from ipasdctl.errors import UserError
from ipasdctl.files import load_checkpoint

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def run_cli(args, capsys) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one stderr line without a traceback; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, (args, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def assert_no_run_folder(out):
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


def tiny_args(data_root, out, *extra):
    """A 2-step-per-epoch CIFAR run: 32 images, batch 16."""
    return ["train", "--dataset", "cifar10", "--data", str(data_root), "--arch", "resnet8", "--method", "ce",
            "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out),
            "--set", "data.train_subset=32", "--set", "optim.warmup_epochs=0", *extra]


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------- rows that need no run

ROWS = {
    # row id: (extra train arguments (callable of tmp_path and the tiny CIFAR root), expected part of the line)
    "unknown-method": (lambda t, d: ["--method", "ipasdd"], "unknown method 'ipasdd' (did you mean 'ipasd'?); known: "),
    "unknown-arch": (lambda t, d: ["--arch", "resnet9"], "unknown arch 'resnet9' (did you mean '"),
    "unknown-dataset": (lambda t, d: ["--dataset", "cifar1O"], "unknown dataset 'cifar1O' (did you mean 'cifar10'?)"),
    "unknown-recipe": (lambda t, d: ["--recipe", "demoo"], "recipe 'demoo' not found"),
    "unknown-recipe-key-set": (lambda t, d: ["--set", "train.epoch=3"],
                               "unknown recipe key 'train.epoch' (did you mean 'epochs'?)"),
    "unknown-recipe-key-yaml": (lambda t, d: ["--recipe", write_recipe(t, "optim:\n  lrr: 0.1\n")],
                                "unknown recipe key 'optim.lrr' (did you mean 'lr'?)"),
    "unknown-method-parameter": (lambda t, d: ["--set", "method.w_dvi=0.5"],
                                 "unknown recipe key 'method.w_dvi' (did you mean 'w_div'?)"),
    "wrong-type-set": (lambda t, d: ["--set", "optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
    "wrong-type-yaml": (lambda t, d: ["--recipe", write_recipe(t, "train: {epochs: many}\n")],
                        "train.epochs must be an integer, got 'many'"),
    "wrong-type-section": (lambda t, d: ["--recipe", write_recipe(t, "train: 5\n")],
                           "train must be a mapping of keys to values, got 5"),
    "malformed-yaml": (lambda t, d: ["--recipe", write_recipe(t, "name: x\ntrain:\n  epochs: 3\n  batch_size: [1, 2\n"
                                                                  "optim:\n  lr: 0.1\n")],
                       "is not valid YAML at line 5, column 6"),
    "malformed-yaml-tab": (lambda t, d: ["--recipe", write_recipe(t, "train:\n  epochs: 3\n\tseed: 1\n")],
                           "is not valid YAML at line 3, column 1"),
    "data-folder-missing": (lambda t, d: ["--dataset", "cifar10", "--data", str(t / "nowhere")],
                            f"nowhere does not exist; point --data at the folder that contains cifar-10-batches-py/ "
                            f"(the 'python version' from {CIFAR_URL})"),
    "data-folder-without-cifar": (lambda t, d: ["--dataset", "cifar10", "--data", str(t)],
                                  "does not contain cifar-10-batches-py/; point --data at the folder holding it"),
    "data-option-missing": (lambda t, d: ["--dataset", "cifar10"], "cifar10 needs --data DIR"),
    "epochs-zero": (lambda t, d: ["--epochs", "0"], "epochs must be a positive integer, got 0"),
    "epochs-negative": (lambda t, d: ["--epochs", "-3"], "epochs must be a positive integer, got -3"),
    "batch-size-zero": (lambda t, d: ["--batch-size", "0"], "batch size must be a positive integer, got 0"),
    "batch-size-negative": (lambda t, d: ["--batch-size", "-4"], "batch size must be a positive integer, got -4"),
    "lr-zero": (lambda t, d: ["--lr", "0"], "learning rate must be a positive number, got 0.0"),
    "lr-negative": (lambda t, d: ["--lr", "-0.1"], "learning rate must be a positive number, got -0.1"),
    "lr-nan": (lambda t, d: ["--set", "optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    "batch-larger-than-data": (lambda t, d: ["--dataset", "cifar10", "--data", str(d), "--batch-size", "500"],
                               "batch size 500 is larger than the training set (200 images)"),
    "out-is-a-file": (lambda t, d: ["--out", str(t / "a-file")], "is a file, not a folder"),
    "out-under-a-file": (lambda t, d: ["--out", str(t / "a-file" / "runs")], "a-file is a file, not a folder; choose a writable --out"),
    "seed-not-integer": (lambda t, d: ["--seed", "abc"], "Invalid value for '--seed'"),
    "seed-not-integer-set": (lambda t, d: ["--set", "train.seed=1.5"], "train.seed must be an integer, got 1.5"),
    "seed-negative": (lambda t, d: ["--seed", "-1"], "seed must be an integer from 0 to 2^63-1, got -1"),
    "cuda-missing": (lambda t, d: ["--device", "cuda"], "--device cuda was requested but CUDA is not available"),
    "cuda-index-missing": (lambda t, d: ["--device", "cuda:1"], "--device cuda:1 was requested but CUDA is not available"),
    "fp16-on-cpu": (lambda t, d: ["--device", "cpu", "--precision", "fp16"], "precision fp16 needs a CUDA device"),
    "resume-missing-folder": (lambda t, d: ["--resume", str(t / "no-run")], "no such run folder"),
    "method-name-not-a-string": (lambda t, d: ["--recipe", write_recipe(t, "method: {name: [ce]}\n")],
                                 "the method must be a name, got list ['ce']"),
    "method-tau-zero": (lambda t, d: ["--method", "ipasd", "--set", "method.tau=0"], "method.tau must be positive, got 0"),
    "val-split-zero": (lambda t, d: ["--set", "data.val_split=0"],
                       "data.val_split must be a positive number of training images, got 0"),
    "val-split-too-large": (lambda t, d: ["--set", "data.val_split=5000"],
                            "data.val_split=5000 leaves no training image (the training set has 1438)"),
    "label-noise-kind": (lambda t, d: ["--set", "data.label_noise.kind=uniform"],
                         "data.label_noise.kind must be symmetric or pairflip, got 'uniform'"),
    "label-noise-rate": (lambda t, d: ["--set", "data.label_noise.rate=1.5"],
                         "data.label_noise.rate must be at least 0 and below 1"),
    "label-noise-key": (lambda t, d: ["--set", "data.label_noise.rat=0.2"],
                        "unknown recipe key 'data.label_noise.rat' (did you mean 'rate'?)"),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(row, tmp_path, tiny_cifar, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "CUDA requested where there is none"
    (tmp_path / "a-file").write_text("not a folder\n")
    extra, expected = ROWS[row]
    out = tmp_path / "runs"
    line = run_cli(["train", "--out", str(out), *extra(tmp_path, tiny_cifar)], capsys)
    assert expected in line, line
    assert_no_run_folder(out)


def test_output_folder_without_write_permission(tmp_path, capsys, monkeypatch):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: make access() answer as it does for everyone else
        real_access = os.access
        monkeypatch.setattr("ipasdctl.runs.folder.os.access",
                            lambda path, mode: False if os.path.samefile(path, out) and mode & os.W_OK
                            else real_access(path, mode))
    try:
        for target in (out, out / "runs"):
            line = run_cli(["train", "--out", str(target)], capsys)
            assert f"{out} is not writable; choose another --out" in line, line
        assert not any(out.iterdir())
    finally:
        out.chmod(0o755)


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("IPASDCTL_DEBUG", "1")
    with pytest.raises(UserError, match="unknown method 'ipasdd'"):
        main(["train", "--out", str(tmp_path / "runs"), "--method", "ipasdd"])


# ---------------------------------------------------------------------------------------- damaged data files


def damaged_copy(make_tiny_cifar, tmp_path, damage: str):
    root = make_tiny_cifar(tmp_path / "data", train=40, test=10)
    folder = root / "cifar-10-batches-py"
    target = folder / "data_batch_3"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:1500])
    elif damage == "garbage":
        target.write_bytes(b"\x00not a pickle" * 200)
    elif damage == "missing-file":
        target.unlink()
    elif damage == "wrong-shape":
        target.write_bytes(pickle.dumps({b"labels": [1, 2], b"data": b"\x00" * 100}, protocol=2))
    elif damage == "labels-out-of-range":  # in the test split (the training subset could leave the row out)
        target = folder / "test_batch"
        batch = pickle.loads(target.read_bytes(), encoding="latin1")
        batch[b"labels"][0] = 12
        target.write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.parametrize("damage,expected", [
    ("truncated", "data_batch_3 is truncated or corrupt (UnpicklingError); download the data set again"),
    ("garbage", "data_batch_3 is truncated or corrupt"),
    ("missing-file", "lacks data_batch_3; expected the full 'python version' layout"),
    ("wrong-shape", "data_batch_3 is corrupt: expected uint8 N x 3072 images and N labels"),
    ("labels-out-of-range", "to 12 but 10 classes; its files are corrupt or do not belong together"),
])
def test_damaged_data_file_is_one_line(damage, expected, tmp_path, make_tiny_cifar, capsys):
    root = damaged_copy(make_tiny_cifar, tmp_path, damage)
    out = tmp_path / "runs"
    line = run_cli(tiny_args(root, out, "--epochs", "1"), capsys)
    assert expected in line, line
    assert_no_run_folder(out)


# ---------------------------------------------------------------------------------------- rows that need a run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, make_tiny_cifar):
    """A finished 1-epoch run on its own tiny CIFAR copy (its data may be changed by the tests below)."""
    base = tmp_path_factory.mktemp("finished")
    root = make_tiny_cifar(base / "data", train=40, test=10)
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(root, base / "runs", "--epochs", "1", "--name", "run"))
    assert exit_info.value.code == 0
    return base / "runs" / "run", root


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_with_a_different_recipe_is_refused(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    line = run_cli(["train", "--resume", str(run_dir), "--set", "optim.lr=0.2"], capsys)
    assert f"--resume {run_dir}: the given recipe differs from the run's (" in line and "optim.lr" in line
    assert "resume without recipe options, or start a new run" in line
    other = write_recipe(tmp_path, "train:\n  epochs: 5\n")
    assert "train.epochs" in run_cli(["train", "--resume", str(run_dir), "--recipe", other], capsys)
    assert snapshot(run_dir) == before  # nothing written, no lock left


def test_resume_recipe_compares_the_options_with_the_runs_own_recipe(finished_run):
    """training.resume_recipe: without --recipe, the options go over the run's saved recipe, so the refusal
    names exactly the keys the options change (what `train --resume RUN --set ...` should report)."""
    from ipasdctl import training
    from ipasdctl.config import parse_set

    run_dir, _ = finished_run
    assert training.resume_recipe(run_dir, None, {}) is None
    same = training.resume_recipe(run_dir, None, parse_set(["train.epochs=1"]))
    assert training.resume(run_dir, same, training.Progress(enabled=False)) == run_dir  # the run's own: accepted
    changed = training.resume_recipe(run_dir, None, parse_set(["optim.lr=0.2", "train.seed=3"]))
    with pytest.raises(UserError) as info:
        training.resume(run_dir, changed)
    assert "differs from the run's (optim.lr, train.seed);" in str(info.value)


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "started"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    line = run_cli(["train", "--resume", str(run_dir)], capsys)
    assert "has no checkpoints/last.pt (the run stopped before its first checkpoint); start a new run" in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_data_whose_class_count_disagrees_with_the_checkpoint(finished_run, tmp_path, capsys):
    finished, root = finished_run
    # a finished run resumes without loading its data ("already finished"): take one that crashed after its
    # last checkpoint, before summary.json, which --resume completes and so loads the data for
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "summary.json").unlink()
    before = snapshot(run_dir)
    meta = root / "cifar-10-batches-py" / "batches.meta"
    original = meta.read_bytes()
    meta.write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(12)]}, protocol=2))
    try:
        line = run_cli(["train", "--resume", str(run_dir)], capsys)
    finally:
        meta.write_bytes(original)
    assert "the checkpoint has 10 classes but data set 'cifar10' has 12" in line
    assert snapshot(run_dir) == before


def _fail_fsync_of(name: str, nth: int, monkeypatch):
    """Make the nth fsync of a temporary file of `name` (e.g. last.pt) fail with ENOSPC, inside ipasdctl.files."""
    import ipasdctl.files as io_module

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
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "1", "--name", "full", "--set", "checkpoint.every_steps=1"),
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
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "1", "--name", "full", "--set", "checkpoint.every_steps=1"),
                   capsys)
    assert "No space left on device" in line
    assert_no_run_folder(out)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path, capsys):
    """lr=1e30: step 1 is finite and checkpointed (every_steps=1); its update makes step 2's loss NaN."""
    out = tmp_path / "runs"
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "2", "--lr", "1e30", "--name", "nan",
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
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "1", "--lr", "1e30"), capsys)
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
            main(tiny_args(tiny_cifar, tmp_path / "runs", "--epochs", "1", "--lr", "1e30",
                           "--set", "train.detect_anomaly=true", "--set", "checkpoint.every_steps=1"))
    assert not torch.is_anomaly_enabled()
    assert load_checkpoint(next((tmp_path / "runs").iterdir()) / "checkpoints" / "last.pt")["global_step"] == 1
