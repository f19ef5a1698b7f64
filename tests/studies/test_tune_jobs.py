"""`tune --jobs N` and `tune --ray`: trials in flight together on the executors of `compare`, each job reporting
its epochs to the study's storage itself; the pruner still prunes there; a crashed trial is re-run once; bad
input, a second crash and a stop end the study as the sequential one ends.

Real trials are the tiny ones of test_tune.py (64 digits, 32 held out, ResNet-8, one thread each); the pruner
and crash test trains nothing (tests/studies/stubbed_trial_job.py) but runs real job processes; the scheduling
tests use a scripted executor (no process at all).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from ipasdctl import training
from ipasdctl.errors import UserError
from ipasdctl.runs import RunFolder, StudyFolder
from ipasdctl.studies import executors, tune as tuning
from ipasdctl.studies.executors import Executor, LocalProcesses, Outcome

from tests.helpers import cli_error, run_cli
from tests.studies.test_tune import TINY, read_trials, tiny_recipe

optuna = pytest.importorskip("optuna")


def storage_trials(study: Path) -> list:
    """The Optuna trials of a study folder's own storage, in trial order."""
    folder = StudyFolder(study)
    name = yaml.safe_load(folder.record.read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=folder.default_storage).get_trials(deepcopy=False)


def workers(rows: list[dict]) -> set[str]:
    return {row["worker"] for row in rows}


# ------------------------------------------------------------------------------------------------ real jobs


@pytest.mark.slow
def test_jobs_2_trains_trials_in_two_processes_at_once_and_a_rerun_adds_none(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["tune", "--trials", "2", *TINY[:-1], "--jobs", "2", "--threads-per-job", "1", "--out", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    rows = read_trials(out)
    assert [(r["trial"], r["state"], r["run"]) for r in rows] == [("0", "complete", "trial-0000"),
                                                                   ("1", "complete", "trial-0001")]
    for row in rows:  # each value is its own run's best validation top-1, trained with its own parameters
        run = RunFolder(out / row["run"])
        assert run.read_summary().best_val_top1 == pytest.approx(float(row["val_top1"]))
        assert run.read_config()["optim"]["lr"] == pytest.approx(float(row["optim.lr"]))
    pids = {w.rsplit(":", 1)[1] for w in workers(rows)}
    assert len(pids) >= 2 and str(os.getpid()) not in pids  # job processes, not this one
    first, second = storage_trials(out)  # both were in flight at once
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    assert "2 trials to run, up to 2 at once" in err and err.count(" complete (") == 2
    assert " complete (2/2): " in err and "; 0 to go" in err

    times = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "nothing to run" in err and len(read_trials(out)) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == times


class StubbedJobs(LocalProcesses):
    """Real job processes whose trials train nothing (tests/studies/stubbed_trial_job.py)."""

    job_module = "tests.studies.stubbed_trial_job"


@pytest.mark.slow
def test_under_jobs_the_pruner_prunes_and_a_crashed_trial_is_re_run_once(tmp_path):
    """Three trials counted on two jobs: trial 0's first process is SIGKILLed and re-run in its folder; runs
    from trial-0002 on (each starts after a trial completed) report 1 % against 90 %: the pruner, in the job,
    stops them."""
    out = tmp_path / "s"
    messages: list[str] = []
    settings = tuning.TuneSettings(trials=3, out=out, startup_trials=1, warmup_epochs=0)
    tuning.run(tiny_recipe(3), settings, progress_enabled=False, say=messages.append,
               executor=StubbedJobs(2, threads=1))
    rows = read_trials(out)
    crashed = [r for r in rows if r["state"] == "fail"]
    assert len(crashed) == 1 and crashed[0]["trial"] == "0" and crashed[0]["run"] == "trial-0000"
    assert "its process was killed by SIGKILL; it is re-run in trial-0000" in " ".join(messages)
    retry = next(r for r in rows if r["note"] == "re-run of trial 0")
    assert crashed[0]["note"] == f"re-run as trial {retry['trial']}"
    assert retry["run"] == "trial-0000" and retry["state"] == "complete"
    assert crashed[0]["optim.lr"] == retry["optim.lr"]  # the same parameters
    counted = [r for r in rows if r["state"] != "fail"]
    assert len(counted) == 3
    pruned = [r for r in counted if r["run"] >= "trial-0002"]
    assert pruned and all(r["state"] == "pruned" and r["epochs"] == "1" and r["note"] == "pruned at epoch 1"
                          for r in pruned)
    assert all(r["state"] == "complete" and r["epochs"] == "3" for r in counted if r not in pruned)
    assert len(workers(counted)) >= 2
    assert "pruned" in StudyFolder(out).summary_markdown.read_text()


@pytest.mark.slow
def test_a_local_ray_instance_runs_trials(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    out = tmp_path / "s"
    code, _, err = run_cli(["tune", "--trials", "2", *TINY, "--ray", "local", "--threads-per-job", "1", "--out",
                            str(out)], capsys)
    assert code == 0, err
    assert not ray.is_initialized()  # the instance tune started is shut down
    rows = read_trials(out)
    assert [(r["state"], r["run"]) for r in rows] == [("complete", "trial-0000"), ("complete", "trial-0001")]
    assert str(os.getpid()) not in {w.rsplit(":", 1)[1] for w in workers(rows)}  # trained by Ray workers
    assert all(RunFolder(out / r["run"]).read_summary().finished for r in rows)
    assert not list(out.glob(".ipasdctl-shared-*"))  # the marker goes when the study ends


# ------------------------------------------------------------------------------------------------ the loop


class ScriptedTrials(Executor):
    """Ends the running jobs first in, first out, each as `script[run name]` says in turn (default: finished
    at 50 % plus the trial's number); trains nothing. Records the jobs it was given."""

    def __init__(self, slots: int, script: dict | None = None, stop_after: int | None = None):
        self.slots = slots
        self.script = {name: list(statuses) for name, statuses in (script or {}).items()}
        self.stop_after = stop_after
        self.running: list = []
        self.started: list = []

    def start(self, job):
        self.started.append(job)
        self.running.append(job)

    def wait(self):
        if self.stop_after is not None and len(self.started) >= self.stop_after:
            self.stopping = signal.SIGTERM
            ended, self.running = self.running, []
            return [Outcome(job, "interrupted", "stopped with a checkpoint") for job in ended]
        job = self.running.pop(0)
        statuses = self.script.get(RunFolder(job.run_dir).name)
        status = statuses.pop(0) if statuses else "finished"
        number = job.trial["number"]
        return [Outcome(job, status, f"{status} on purpose", result={"value": 50.0 + number})]


def test_a_trial_that_crashes_twice_ends_the_study_with_one_line_and_a_rerun_tries_it_again(tmp_path):
    out = tmp_path / "s"
    executor = ScriptedTrials(2, {"trial-0000": ["crashed", "crashed"]})
    messages: list[str] = []
    with pytest.raises(UserError, match=r"trial 2 crashed twice \(crashed on purpose\); rerun the same") as error:
        tuning.run(tiny_recipe(), tuning.TuneSettings(trials=3, out=out), False, messages.append, executor)
    assert error.value.exit_code == 1  # not bad input
    started = [(job.trial["number"], RunFolder(job.run_dir).name) for job in executor.started]
    # the re-run is a new trial in the same folder, started before any new one; trial 3 was running already
    assert started == [(0, "trial-0000"), (1, "trial-0001"), (2, "trial-0000"), (3, "trial-0003")]
    assert [(r["trial"], r["state"], r["note"]) for r in read_trials(out)] == [
        ("0", "fail", "re-run as trial 2"), ("1", "complete", ""), ("2", "fail", "re-run of trial 0"),
        ("3", "complete", "")]
    assert "trial 0: crashed on purpose; it is re-run in trial-0000" in messages
    assert "trial 2 (a re-run of trial 0) failed again: crashed on purpose; no new trial starts" in messages

    executor = ScriptedTrials(2)
    tuning.run(tiny_recipe(), tuning.TuneSettings(trials=3, out=out), False, None, executor)
    started = [(job.trial["number"], RunFolder(job.run_dir).name) for job in executor.started]
    assert started == [(4, "trial-0000")]  # the one trial missing: trial 2's re-run
    assert [r["state"] for r in read_trials(out)] == ["fail", "complete", "fail", "complete", "complete"]


def test_bad_input_in_a_job_starts_no_new_trial_and_is_raised_once_the_others_end(tmp_path):
    out = tmp_path / "s"
    executor = ScriptedTrials(2, {"trial-0000": ["error"]})
    with pytest.raises(UserError, match="^error on purpose$"):
        tuning.run(tiny_recipe(), tuning.TuneSettings(trials=4, out=out), False, None, executor)
    assert len(executor.started) == 2  # trial 1 ran to its end; nothing started after the error
    assert [r["state"] for r in read_trials(out)] == ["fail", "complete"]


def test_a_stop_fails_the_running_trials_and_the_next_tune_re_runs_them(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(training.Interrupted) as stop:
        tuning.run(tiny_recipe(), tuning.TuneSettings(trials=3, out=out), False, None, ScriptedTrials(2, stop_after=2))
    assert stop.value.code == 143 and stop.value.run_dir == out
    assert [r["state"] for r in read_trials(out)] == ["fail", "fail"]
    assert not (out / ".lock").exists()
    executor = ScriptedTrials(2)
    tuning.run(tiny_recipe(), tuning.TuneSettings(trials=3, out=out), False, None, executor)
    assert [RunFolder(job.run_dir).name for job in executor.started] == ["trial-0000", "trial-0001", "trial-0004"]
    assert [r["state"] for r in read_trials(out)] == ["fail", "fail", "complete", "complete", "complete"]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be 1 or more, got 0"),
    (["--jobs", "2", "--threads-per-job", "0"], "--threads-per-job must be 1 or more"),
    (["--devices", "0,1"], "--devices names GPUs, but the runs are on CPU"),
])
def test_bad_parallel_options_are_one_line_and_leave_no_folder(args, message, tmp_path, capsys):
    out = tmp_path / "s"
    assert message in cli_error(["tune", "--trials", "2", *TINY, *args, "--out", str(out)], capsys)
    assert not out.exists()


def test_missing_ray_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "s"
    line = cli_error(["tune", "--trials", "2", *TINY, "--ray", "local", "--out", str(out)], capsys)
    assert line == "error: " + executors.RAY_MISSING and not out.exists()


def test_a_ray_cluster_that_cannot_be_reached_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    ray = pytest.importorskip("ray")

    def unreachable(**kwargs):
        raise ConnectionError(f"Could not find any running Ray instance at {kwargs['address']}")

    monkeypatch.setattr(ray, "init", unreachable)  # a real unreachable address takes minutes to give up
    out = tmp_path / "s"
    line = cli_error(["tune", "--trials", "2", *TINY, "--ray", "10.0.0.1:6379", "--out", str(out)], capsys)
    assert "--ray 10.0.0.1:6379: cannot connect to a Ray cluster" in line and not out.exists()


def test_the_api_takes_the_parallel_options_of_compare(tmp_path, one_thread):
    import ipasdctl

    overrides = {"method": {"name": "ce"}, "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
                 "data": {"train_subset": 64, "val_split": 32}}
    with pytest.raises(UserError, match="--jobs must be 1 or more, got 0"):
        ipasdctl.tune("demo", trials=1, out=tmp_path / "bad", overrides=overrides, jobs=0)
    assert not (tmp_path / "bad").exists()
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    study = ipasdctl.tune("demo", trials=1, out=tmp_path / "s", overrides=overrides, threads_per_job=2)
    assert RunFolder(study / "trial-0000").read_summary().threads == 2  # the trial trained with the count asked
    assert torch.get_num_threads() == before  # and this process's count is as it was
