"""Exact resume: a run SIGKILLed mid-epoch (or stopped by SIGTERM/SIGINT) and resumed ends with the same
metrics.csv and bitwise the same weights, optimizer and method state as the uninterrupted run (on CPU).

The killed runs are real `python -m ipasdctl train` processes on a tiny CIFAR-10 folder; the references
(trained in this process while the kills run) and the resumes run through the CLI in this process, one
thread each like the subprocesses: a resume reads only the run folder, and the references agreeing bitwise
with runs begun in another process shows that nothing of a process's own state enters the numbers. The kill
is made deterministic with the engine's test hook IPASDCTL_TEST_SIGNAL_AT_STEP="N[:SIGNAL]": after global step
N's update the process sends itself the signal (SIGKILL: no handler, no cleanup, a stale .lock left behind;
SIGTERM in this process: the trainer's handler, as in a subprocess).
Settings: 48 images, batch 16 -> 3 steps per epoch, 2 epochs, checkpoint.every_steps=2 (checkpoints after
global steps 2 (mid-epoch 1), 3 (end of epoch 1), 4 (mid-epoch 2) and 6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipasdctl.cli import main
from ipasdctl.runs import RunLock
from ipasdctl.safe_io import load_checkpoint, save_checkpoint
from tests.helpers import metrics_without_timings, run_cli_here
from tests.helpers import start_cli as start

pytestmark = pytest.mark.slow  # real processes (torchrun, kills and resumes): tens of seconds

def base_args(data_root: Path, out: Path, name: str, method: str) -> list[str]:
    return ["train", "--dataset", "cifar10", "--data", str(data_root), "--arch", "resnet8", "--method", method,
            "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out), "--name", name,
            "--set", "data.train_subset=48", "--set", "checkpoint.every_steps=2", "--set", "optim.warmup_epochs=1"]



def finish(processes: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str, str]]:
    done = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        done[key] = (process.returncode, stdout, stderr)
    return done



def assert_same_tensors(a, b, where: str) -> None:
    """Equal structure, and every tensor bitwise equal (torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tiny_cifar, tmp_path_factory):
    """Reference and interrupted+resumed runs of ipasd and ce, all finished.

    ipasd: killed after global step 5 (last.pt: epoch 2, step 1, memories and prototypes in use), resumed.
    ce:    killed after global step 3 (last.pt: epoch 1, step 2, no epoch finished yet), resumed and stopped
           by SIGTERM during step 5 (it finishes the step and saves it), resumed again to the end.
    """
    out = tmp_path_factory.mktemp("resume_runs")
    log: dict[str, tuple[int, str, str]] = {}
    stale_locks: dict[str, bool] = {}
    checkpoints: dict[str, dict] = {}

    def args(name, method):
        return base_args(tiny_cifar, out, name, method)

    def resume(name, signal_at=None):
        return run_cli_here(["train", "--resume", str(out / name), "--quiet"],
                            {"IPASDCTL_TEST_SIGNAL_AT_STEP": signal_at} if signal_at else None)

    # only a SIGKILL needs a process of its own; the references train here while the kills run
    killed = {"ipasd-kill": start(args("ipasd", "ipasd"), "5"), "ce-kill": start(args("ce", "ce"), "3")}
    log["ipasd-ref"] = run_cli_here(args("ipasd-ref", "ipasd"))
    log["ce-ref"] = run_cli_here(args("ce-ref", "ce"))
    log.update(finish(killed))
    for name in ("ipasd", "ce"):
        stale_locks[name] = (out / name / ".lock").exists()
        checkpoints[f"{name}-kill"] = load_checkpoint(out / name / "checkpoints" / "last.pt")
    log["ipasd-resume"] = resume("ipasd")
    log["ce-term"] = resume("ce", "5:TERM")
    checkpoints["ce-term"] = load_checkpoint(out / "ce" / "checkpoints" / "last.pt")
    log["ce-resume"] = resume("ce")
    return {"out": out, "log": log, "stale_locks": stale_locks, "checkpoints": checkpoints}


def test_processes_were_killed_where_the_hook_says(runs):
    log = runs["log"]
    for key in ("ipasd-ref", "ce-ref", "ipasd-resume", "ce-resume"):
        assert log[key][0] == 0, (key, log[key][2])
    for key in ("ipasd-kill", "ce-kill"):
        assert log[key][0] == -signal.SIGKILL, (key, log[key][2])
    # the mid-epoch checkpoints the kills fell back to (the killed step itself is lost and redone)
    ck = runs["checkpoints"]
    assert (ck["ipasd-kill"]["epoch"], ck["ipasd-kill"]["step_in_epoch"], ck["ipasd-kill"]["global_step"]) == (1, 1, 4)
    assert (ck["ce-kill"]["epoch"], ck["ce-kill"]["step_in_epoch"], ck["ce-kill"]["global_step"]) == (0, 2, 2)
    # the epoch's running sums travel with a mid-epoch checkpoint: 2 steps of 16 images, no row yet
    assert ck["ce-kill"]["meter"]["count"].item() == 32 and ck["ce-kill"]["rows"] == []
    assert ck["ce-kill"]["epoch_seconds"] > 0 and len(ck["ipasd-kill"]["rows"]) == 1
    assert ck["ipasd-kill"]["method"]["prototypes"]["ready"]
    # SIGKILL leaves the lock file behind (nothing runs on SIGKILL); the resume took it over and removed it
    assert runs["stale_locks"] == {"ipasd": True, "ce": True}
    assert not (runs["out"] / "ipasd" / ".lock").exists() and not (runs["out"] / "ce" / ".lock").exists()


@pytest.mark.parametrize("method", ["ipasd", "ce"])
def test_resumed_run_equals_the_uninterrupted_run(runs, method):
    out = runs["out"]
    reference, resumed = out / f"{method}-ref", out / method
    assert metrics_without_timings(resumed) == metrics_without_timings(reference)
    assert len(metrics_without_timings(reference)) == 2
    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert_same_tensors(a["model"], b["model"], "model")  # bitwise: CPU kernels are deterministic
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["method"], b["method"], "method")  # ipasd: memories and prototypes
    assert_same_tensors(a["meter"], b["meter"], "meter")
    assert_same_tensors(a["rng"], b["rng"], "rng")
    for key in ("epoch", "step_in_epoch", "global_step", "best"):
        assert a[key] == b[key], key
    if method == "ipasd":
        assert a["method"]["prototypes"]["ready"] and a["method"]["last_softmax"]["table"].shape == (48, 10)
    assert_same_tensors(load_checkpoint(reference / "checkpoints" / "best.pt")["model"],
                        load_checkpoint(resumed / "checkpoints" / "best.pt")["model"], "best")
    import json

    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (reference, resumed))
    for key in ("best_top1", "best_top5", "best_epoch", "last_top1", "last_top5", "finished"):
        assert sa[key] == sb[key], key
    assert sb["wall_seconds"] > 0 and sb["train_seconds"] > 0


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(runs):
    code, _stdout, stderr = runs["log"]["ce-term"]
    run_dir = runs["out"] / "ce"
    assert code == 143
    assert stderr.strip().splitlines()[-1] == f"interrupted: checkpoint written; resume with: ipasdctl train --resume {run_dir}"
    state = runs["checkpoints"]["ce-term"]
    # the signal arrived during global step 5 (epoch 2, step 2): that step finished and was saved
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 5)


def test_sigint_in_process_exits_130_after_a_checkpoint(tiny_cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IPASDCTL_TEST_SIGNAL_AT_STEP", "2:INT")
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        main(base_args(tiny_cifar, tmp_path, "int", "ce"))
    assert exit_info.value.code == 130
    run_dir = tmp_path / "int"
    assert f"resume with: ipasdctl train --resume {run_dir}" in capsys.readouterr().err
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the engine put the handler back
    assert not (run_dir / ".lock").exists()


def test_a_run_of_a_version_whose_data_section_held_every_key_resumes_twice(tiny_cifar, tmp_path, monkeypatch):
    """Before each data set declared its own keys, every config.yaml and checkpoint held data.num_workers,
    image_size and val_fraction. Such a run resumes; stopped again, its new last.pt (the keys gone) and its
    old config.yaml (the keys there) still agree, and it resumes to the end."""
    import yaml

    run_dir = tmp_path / "old"
    monkeypatch.setenv("IPASDCTL_TEST_SIGNAL_AT_STEP", "2:INT")
    with pytest.raises(SystemExit):
        main(base_args(tiny_cifar, tmp_path, "old", "ce"))
    former = {"num_workers": 2, "image_size": None, "val_fraction": 0.2}
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["config"]["data"].update(former)
    save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"].update(former)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    monkeypatch.setenv("IPASDCTL_TEST_SIGNAL_AT_STEP", "4:INT")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run_dir), "--quiet"])
    assert exit_info.value.code == 130
    assert "num_workers" not in load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]["data"]
    monkeypatch.delenv("IPASDCTL_TEST_SIGNAL_AT_STEP")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run_dir), "--quiet"])
    assert exit_info.value.code == 0
    assert json.loads((run_dir / "summary.json").read_text())["finished"]


def test_a_run_folder_in_use_is_refused_and_a_dead_owner_is_taken_over(tiny_cifar, tmp_path, capsys):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = RunLock(run_dir)
    holder.acquire()  # another open file description: conflicts like another process would
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--resume", str(run_dir)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"run folder {run_dir} is in use by process {os.getpid()}" in err
        with pytest.raises(Exception, match="in use"):
            RunLock(run_dir).acquire()
    finally:
        holder.release()
    assert not (run_dir / ".lock").exists()
    # a lock file left by a dead process (pid of a finished child) is free
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / ".lock").write_text(f"{child.stdout.strip()} somehost\n")
    lock = RunLock(run_dir)
    lock.acquire()
    assert (run_dir / ".lock").read_text().split()[0] == str(os.getpid())
    lock.release()
