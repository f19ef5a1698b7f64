"""Many runs at once: `compare --jobs N` (processes on this machine) and `--ray` give the rows of the sequential
run; a SIGKILLed job is retried from its checkpoint; the scheduler's waits, retries, failures, stops and
partial tables (with a scripted executor: no training); GPU assignment; the one-line errors.

Real runs are tiny (the embedded digits cut to 64 training images, batch 32: 2 steps per epoch, 2 epochs) and
pinned to one thread per run, so that every executor computes bitwise the same numbers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ipasdctl import runtime, training
from ipasdctl.analysis.collect import collect_runs
from ipasdctl.analysis.selection import load_results
from ipasdctl.errors import UserError
from ipasdctl.runs import RunFolder, RunSummary
from ipasdctl.studies import compare, executors
from ipasdctl.studies import plan as planning
from ipasdctl.studies.executors import Executor, LocalProcesses, Outcome, Sequential, choose_gpus, make_executor
from ipasdctl.studies.job import job_spec, run_job
from ipasdctl.studies.scheduler import TEST_SIGNAL_RUN_ENV, RunsFailed
from ipasdctl.studies.summary import write_tables

from tests.helpers import REPO, run_cli, tiny_recipe

TWO_EPOCHS = ["--recipe", "demo", "--epochs", "2", "--batch-size", "32", "--device", "cpu",
              "--set", "data.train_subset=64", "--threads-per-job", "1"]
TIMING = ["train_seconds", "images_per_second", "run_dir"]


def tiny_two_epochs():
    recipe = tiny_recipe()
    recipe.train.epochs = 2
    return recipe


def rows(out: Path) -> pd.DataFrame:
    """results.csv without the timing columns and the folder: what must not depend on the executor."""
    return pd.read_csv(out / "results.csv").drop(columns=TIMING)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """ce and ipasd, seed 0, 2 epochs, one after another in this process with one thread each."""
    out = tmp_path_factory.mktemp("sequential") / "c"
    comparison = planning.plan(tiny_two_epochs(), "", [0], out)
    compare.run(comparison, say=None, executor=Sequential(training.Progress(enabled=False), threads=1))
    return out


# ------------------------------------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_jobs_2_gives_the_sequential_rows_and_a_sigkilled_job_is_retried(sequential, tmp_path, capsys, monkeypatch):
    """Both runs at once, each in its own process; ipasd-s0's first process is SIGKILLed after step 3 (epoch 2,
    after epoch 1's checkpoint), its second resumes: the table is complete and bitwise the sequential one."""
    out = tmp_path / "c"
    monkeypatch.setenv(TEST_SIGNAL_RUN_ENV, "ipasd-s0=3:KILL")
    code, stdout, stderr = run_cli(["compare", "--seeds", "0", *TWO_EPOCHS, "--jobs", "2", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(out)
    assert "[2/2] ipasd-s0: its process was killed by SIGKILL; trying once more from its last checkpoint" in stderr
    assert "[2/2] ipasd-s0: resuming after epoch 1/2" in stderr
    finished = [line for line in stderr.splitlines() if " finished in " in line]
    assert len(finished) == 2 and finished[-1].endswith("2/2 runs done")
    pd.testing.assert_frame_equal(rows(out), rows(sequential))
    assert rows(out)["status"].tolist() == ["finished", "finished"]
    for name in ["ce-s0", "ipasd-s0"]:  # every epoch's numbers, not only the summary's
        ours = pd.read_csv(out / name / "metrics.csv").drop(columns=["epoch_seconds", "images_per_second"])
        theirs = pd.read_csv(sequential / name / "metrics.csv").drop(columns=["epoch_seconds", "images_per_second"])
        pd.testing.assert_frame_equal(ours, theirs)


@pytest.mark.slow
def test_ray_with_a_local_instance_gives_the_sequential_rows(sequential, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        out = tmp_path / "c"
        with pytest.raises(UserError, match="no node of the Ray cluster has that many CPUs .the largest has 2"):
            executors.RayTasks("local", threads=3, gpu=False).open(tmp_path)  # it would wait for ever
        messages: list[str] = []
        comparison = planning.plan(tiny_two_epochs(), "", [0], out)
        compare.run(comparison, say=messages.append, executor=executors.RayTasks("local", threads=1, gpu=False))
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(rows(out), rows(sequential))
    assert sum(" finished in " in m for m in messages) == 2
    assert not list(out.glob(".ipasdctl-shared-*"))  # the marker goes when the comparison ends


@pytest.mark.slow
def test_ctrl_c_stops_every_job_with_a_checkpoint_and_the_rerun_resumes(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["compare", "--method", "ce", "--seeds", "0,1", *TWO_EPOCHS, "--epochs", "20", "--out", str(out),
            "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # the interrupted comparison in a process of its own (the signal goes to it); the rerun in this one
    process = subprocess.Popen([sys.executable, "-m", "ipasdctl", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    checkpoints = [out / name / "checkpoints" / "last.pt" for name in ("ce-s0", "ce-s1")]
    deadline = time.monotonic() + 120
    while not all(path.is_file() for path in checkpoints) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopping: each of the 2 running jobs writes its checkpoint" in stderr
    assert "rerun the same `ipasdctl compare` command" in stderr.strip().splitlines()[-1]
    for path in checkpoints:
        assert path.is_file() and RunFolder(path.parent.parent).state() == "resumable"
    assert pd.read_csv(out / "results.csv")["status"].tolist() == ["pending", "pending"]

    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert stderr.count(": resuming after epoch") == 2
    results = pd.read_csv(out / "results.csv")
    assert results["status"].tolist() == ["finished", "finished"] and results["epochs"].tolist() == [20, 20]


def test_a_second_compare_on_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    lock = RunFolder(out).lock()
    lock.acquire()  # what a running `compare` holds
    try:
        code, _, stderr = run_cli(["compare", "--seeds", "0", *TWO_EPOCHS, "--jobs", "2", "--out", str(out)], capsys)
    finally:
        lock.release()
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "in use by process" in stderr
    assert not (out / "ce-s0").exists()


# ------------------------------------------------------------------------------------------------ the scheduler


class Scripted(Executor):
    """Ends the running jobs first in, first out, each attempt as `script[name][attempt - 1]` says (default:
    finished, with a summary.json); a crash leaves a checkpoint to resume. Records what happened."""

    def __init__(self, slots: int, script: dict | None = None, stop_on_first_wait: bool = False):
        self.slots = slots
        self.script = script or {}
        self.stop_on_first_wait = stop_on_first_wait
        self.running: list = []
        self.events: list[tuple] = []

    def start(self, job):
        self.events.append(("start", job.name, job.attempt, job.resume))
        self.running.append(job)

    def wait(self):
        if self.stop_on_first_wait:
            self.stopping = signal.SIGINT
            ended, self.running = self.running, []
            return [Outcome(job, "interrupted") for job in ended]
        job = self.running.pop(0)
        status = self.script.get(job.name, ["finished"] * 2)[job.attempt - 1]
        folder = RunFolder(job.run_dir)
        folder.checkpoints.mkdir(parents=True, exist_ok=True)
        folder.last.write_bytes(b"")
        folder.write_config(job.recipe)
        if status == "finished":
            folder.write_summary(RunSummary(finished=True, method=job.recipe.method["name"], seed=job.recipe.train.seed,
                                            best_top1=50.0, last_top1=40.0, train_seconds=1.0, macs=3125888))
        self.events.append(("end", job.name, status))
        return [Outcome(job, status, f"{status} on purpose", seconds=2.0)]


def test_a_run_waits_for_the_run_it_needs_without_holding_up_the_others(tmp_path):
    comparison = planning.plan(tiny_recipe(), "tf-kd-self", [0, 1], tmp_path / "c")
    assert compare.prerequisites(comparison) == {"tf-kd-self-s0": "ce-s0", "tf-kd-self-s1": "ce-s1"}
    executor = Scripted(slots=3)
    compare.run(comparison, say=None, executor=executor)
    events = executor.events
    starts = [event[1] for event in events if event[0] == "start"]
    assert starts[:3] == ["ce-s0", "ipasd-s0", "ce-s1"]  # tf-kd-self-s0 waits; ce-s1 does not wait behind it
    for seed in (0, 1):
        assert events.index(("end", f"ce-s{seed}", "finished")) < events.index(("start", f"tf-kd-self-s{seed}", 1, False))


def test_a_crashed_run_is_retried_once_then_failed_while_the_others_finish(tmp_path):
    out = tmp_path / "c"
    comparison = planning.plan(tiny_recipe(), "", [0, 1], out)
    executor = Scripted(slots=2, script={"ipasd-s0": ["crashed", "crashed"], "ce-s1": ["crashed", "finished"]})
    messages: list[str] = []
    with pytest.raises(RunsFailed) as failure:
        compare.run(comparison, say=messages.append, executor=executor)
    assert failure.value.exit_code == 1 and "1 run of 4 failed (ipasd-s0" in str(failure.value)
    starts = [event for event in executor.events if event[0] == "start"]
    assert ("start", "ce-s1", 2, True) in starts and ("start", "ipasd-s0", 2, True) in starts  # resumed
    assert len(starts) == 6  # 4 runs, 2 retries, no third attempt
    assert "[2/4] ipasd-s0: crashed on purpose; trying once more from its last checkpoint" in messages
    assert "[2/4] ipasd-s0: failed: crashed on purpose (attempt 2 of 2)" in messages
    results = pd.read_csv(out / "results.csv")
    assert results["status"].tolist() == ["finished", "failed", "finished", "finished"]
    assert results["last_top1"].isna().tolist() == [False, True, False, False]
    assert results["macs"].tolist()[2] == 3125888 and ",3125888," in (out / "results.csv").read_text()  # not 3.12589e+06
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary["runs"].to_dict() == {"ce": 2, "ipasd": 1}
    markdown = (out / "summary.md").read_text()
    assert "**Partial table**: 3 of 4 runs finished." in markdown and "Failed: ipasd-s0: crashed on purpose" in markdown
    # report and selection read the finished runs of a partial comparison only
    runs, _ = collect_runs([out])
    assert sorted(run.run_dir.name for run in runs) == ["ce-s0", "ce-s1", "ipasd-s1"]
    assert load_results([out])["status"].tolist() == ["finished"] * 3


def test_an_error_is_not_retried_and_a_run_that_needs_a_failed_run_is_not_trained(tmp_path):
    comparison = planning.plan(tiny_recipe(), "tf-kd-self", [0], tmp_path / "c")
    executor = Scripted(slots=2, script={"ce-s0": ["error"]})
    messages: list[str] = []
    with pytest.raises(RunsFailed):
        compare.run(comparison, say=messages.append, executor=executor)
    assert [event[1] for event in executor.events if event[0] == "start"] == ["ce-s0", "ipasd-s0"]
    assert "[3/3] tf-kd-self-s0: failed: not trained: the run it needs, ce-s0, failed" in messages


def test_the_tables_are_partial_while_runs_are_pending(tmp_path, monkeypatch):
    out = tmp_path / "c"
    comparison = planning.plan(tiny_recipe(), "", [0], out)
    seen = []

    def tables(comparison, failed):
        write_tables(comparison, failed)
        seen.append((pd.read_csv(out / "results.csv")["status"].tolist(), (out / "summary.md").read_text()))

    monkeypatch.setattr(compare, "write_tables", tables)  # what the tables say each time compare rewrites them
    compare.run(comparison, say=None, executor=Scripted(slots=1))
    assert seen[0][0] == ["finished", "pending"]
    assert "**Partial table**: 1 of 2 runs finished. Pending (training, or not started): ipasd-s0." in seen[0][1]
    assert seen[-1][0] == ["finished", "finished"] and "Partial" not in seen[-1][1]


def test_a_stop_signal_starts_no_new_job_and_raises_interrupted(tmp_path):
    out = tmp_path / "c"
    comparison = planning.plan(tiny_recipe(), "", [0, 1], out)
    executor = Scripted(slots=2, stop_on_first_wait=True)
    with pytest.raises(training.Interrupted) as stop:
        compare.run(comparison, say=None, executor=executor)
    assert stop.value.code == 130 and stop.value.run_dir == out
    assert [event[1] for event in executor.events] == ["ce-s0", "ipasd-s0"]
    assert pd.read_csv(out / "results.csv")["status"].tolist() == ["pending"] * 4
    assert not (out / ".lock").exists()  # the comparison folder is free again


def test_a_worker_that_cannot_see_out_is_one_fatal_line(tmp_path):
    spec = job_spec(tmp_path / "c" / "ce-s0", False, tiny_recipe(), marker=tmp_path / "c" / ".ipasdctl-shared-x")
    result = run_job(spec)
    assert result["status"] == "error" and result["fatal"] is True
    assert f"cannot see --out {tmp_path / 'c'}" in result["message"] and "every node mounts" in result["message"]
    assert not (tmp_path / "c" / "ce-s0").exists()

    class Blind(Scripted):
        def wait(self):
            return [Outcome(self.running.pop(0), "error", result["message"], fatal=True)]

    with pytest.raises(UserError, match="cannot see --out"):
        compare.run(planning.plan(tiny_recipe(), "", [0], tmp_path / "c"), say=None, executor=Blind(slots=1))


# ------------------------------------------------------------------------------------------------ choices


def test_missing_ray_is_one_line_saying_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "c"
    code, _, stderr = run_cli(["compare", "--seeds", "0", *TWO_EPOCHS, "--ray", "local", "--out", str(out)], capsys)
    assert code == 2
    assert stderr.strip().splitlines() == ["error: " + executors.RAY_MISSING]
    assert "pip install 'ipasdctl[ray]'" in stderr and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be 1 or more"),
    (["--jobs", "2", "--threads-per-job", "0"], "--threads-per-job must be 1 or more"),
    (["--devices", "0,1"], "--devices names GPUs, but the runs are on CPU"),
])
def test_bad_parallel_options_are_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "c"
    code, _, stderr = run_cli(["compare", "--seeds", "0", *TWO_EPOCHS, *args, "--out", str(out)], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not out.exists()


def test_cpu_jobs_share_the_cores_and_one_job_is_the_sequential_executor():
    recipe = tiny_recipe()
    local = make_executor(recipe, jobs=2)
    assert isinstance(local, LocalProcesses) and local.slots == 2
    assert local.threads == max(1, runtime.available_cpus() // 2) and local.free_gpus is None
    assert make_executor(recipe, jobs=2, threads=3).threads == 3
    assert isinstance(make_executor(recipe), Sequential) and isinstance(make_executor(recipe, jobs=1), Sequential)


def test_gpus_are_shared_out_one_per_job():
    assert executors.visible_gpus(4, None) == ["0", "1", "2", "3"]
    assert executors.visible_gpus(2, "5,7") == ["5", "7"]  # a child names the parent's visible GPUs by their ids
    assert choose_gpus(None, None, ["5", "7"]) == ["5", "7"]
    assert choose_gpus("1", None, ["5", "7"]) == ["7"]
    assert choose_gpus(None, 1, ["5", "7"]) == ["5"]
    with pytest.raises(UserError, match="--jobs 3 needs 3 GPUs"):
        choose_gpus(None, 3, ["5", "7"])
    with pytest.raises(UserError, match="--devices expects comma-separated GPU indices below 2"):
        choose_gpus("0,2", None, ["5", "7"])


def test_each_local_job_gets_its_own_gpu_and_its_threads(tmp_path, monkeypatch):
    started = []

    class Process:
        def __init__(self, command, env, **kwargs):
            started.append((command, env))
            self.returncode = -signal.SIGKILL

        def poll(self):
            return self.returncode

    monkeypatch.setattr(executors.subprocess, "Popen", Process)
    executor = LocalProcesses(2, threads=3, gpus=["5", "7"])
    executor.open(tmp_path)
    try:
        comparison = planning.plan(tiny_recipe(), "", [0], tmp_path / "c")
        for planned in comparison.runs:
            executor.start(executors.Job(planned.name, planned.run_dir, False, planned.recipe))
        assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["5", "7"]
        assert {env["OMP_NUM_THREADS"] for _, env in started} == {"3"}
        assert all(command[1:3] == ["-m", "ipasdctl.studies.job"] for command, _ in started)
        outcomes = executor.wait()
        assert [o.status for o in outcomes] == ["crashed", "crashed"]
        assert outcomes[0].message == "its process was killed by SIGKILL"
        assert sorted(executor.free_gpus) == ["5", "7"]  # back in the pool
    finally:
        executor.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_jobs_default_to_one_per_visible_gpu():
    recipe = tiny_recipe()
    recipe.train.device = "cuda"
    executor = make_executor(recipe, devices="0")
    assert isinstance(executor, LocalProcesses) and executor.slots == 1 and len(executor.free_gpus) == 1
    assert make_executor(recipe, jobs=torch.cuda.device_count()).slots == torch.cuda.device_count()
