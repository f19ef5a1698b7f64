"""How the runs of a comparison are carried out: one after another in this process (the default), as
processes on this machine (`compare --jobs N`), or as tasks on a Ray cluster (`compare --ray ADDRESS`).

The trials of a study (`tune --jobs N`, `--ray`) go through the same executors, driven by studies/tune_jobs.py
(the sequential study trains in `tune`'s own process instead, through Optuna's optimize loop).

Each is an `Executor` with one small interface, which the comparison's scheduler (studies/scheduler.py) drives:
`open(out)` / `close()` around the comparison, `slots` runs at once, `start(job)`, `wait()` for the outcomes
of the jobs that ended (at least one; none right after a stop signal was passed on to the jobs), and
`stopping` (the signal that asked every job to stop, if one did).

- Sequential: trains in this process with the progress bar, as `compare` always did; an error or a Ctrl-C
  ends the comparison as it ends one run.
- Local processes: each job is `python -m ipasdctl.studies.job` in a session of its own; on CPU with
  `threads` torch threads (OMP_NUM_THREADS too), on CUDA with one GPU (CUDA_VISIBLE_DEVICES). SIGINT/SIGTERM
  reach this process only and are forwarded to every job once: each checkpoints and stops.
- Ray: each job is a Ray task asking for one GPU or `threads` CPUs, run by `job.run_job` on whichever node
  Ray picks; a marker file written into --out tells a node that cannot see the shared folder.

A run gives the same metrics whichever executor trains it when it gets the same thread count (CPU kernels are
deterministic for a given count): `--threads-per-job` pins it, the sequential executor included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sized

import torch

import ipasdctl

from .. import runtime, training
from ..analysis.tables import count_noun
from ..config import Recipe
from ..errors import UserError, one_line
from ..runs import read_json
from ..safe_io import atomic_write_text
from .job import job_spec, run_job

RAY_MISSING = "--ray needs Ray, which is not installed; install it with: pip install 'ipasdctl[ray]'"
POLL_SECONDS = 0.1


@dataclass
class Job:
    """One attempt at one planned run."""

    name: str
    run_dir: Path
    resume: bool  # continue from checkpoints/last.pt; else a new run in run_dir
    recipe: Recipe
    attempt: int = 1
    env: dict = field(default_factory=dict)  # variables for this attempt only (the scheduler's test hook)
    started: float = 0.0
    trial: Optional[dict] = None  # a tuning trial to train and report to its study (studies/trial.trial_spec)


@dataclass
class Outcome:
    job: Job
    status: str  # finished | error (a one-line user error) | interrupted | crashed (killed, a traceback, a lost node)
    message: str = ""
    fatal: bool = False  # the comparison cannot go on (a node without the shared --out)
    seconds: float = 0.0
    result: dict = field(default_factory=dict)  # what the job returned (a trial's value), empty after a crash


class Executor:
    """The interface the scheduler uses (and the sequential executor's defaults)."""

    slots = 1
    stopping: Optional[int] = None

    def open(self, out: Path) -> None:
        pass

    def close(self) -> None:
        pass

    def start(self, job: Job) -> None:
        raise NotImplementedError

    def wait(self) -> list[Outcome]:
        raise NotImplementedError

    def drive(self, start: Callable[[], None], settle: Callable[[Outcome], None], running: Sized, noun: str,
              say: Callable[[str], None], folder: Path) -> None:
        """The loop both schedulers share: `start` fills the free slots while no stop is asked, each outcome is
        `settle`d as it comes, the stop is announced once; once nothing runs, a stop raises Interrupted (exit
        130 after SIGINT, 143 after SIGTERM) naming `folder`, the one to rerun."""
        stop_said = False
        while True:
            if self.stopping is None:
                start()
            elif not stop_said and running:
                stop_said = True
                say(f"stopping: each of the {count_noun(len(running), noun)} writes its checkpoint")
            if not running:
                break
            for outcome in self.wait():
                settle(outcome)
        if self.stopping is not None:
            raise training.Interrupted(130 if self.stopping == signal.SIGINT else 143, folder)


class Sequential(Executor):
    """Train each job in this process, with the progress bar; errors and Ctrl-C propagate as from one run."""

    def __init__(self, progress: Optional[training.Progress] = None, threads: Optional[int] = None):
        self.progress = progress
        self.threads = threads
        self._job: Optional[Job] = None

    def start(self, job: Job) -> None:
        self._job = job

    def wait(self) -> list[Outcome]:
        job, self._job = self._job, None
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if job.resume:
                training.resume(job.run_dir, None, self.progress)
            else:
                training.train_into(job.recipe, job.run_dir, self.progress)
        finally:
            torch.set_num_threads(before)
        return [Outcome(job, "finished", seconds=time.monotonic() - job.started)]


class _ForwardsSignals(Executor):
    """SIGINT/SIGTERM while the comparison runs: remember it and ask every job to stop, once."""

    def open(self, out: Path) -> None:
        self.stopping = None
        self._asked = False
        self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self) -> None:
        for sig, handler in getattr(self, "_handlers", {}).items():
            signal.signal(sig, handler)
        self._handlers = {}

    def _on_signal(self, signum, _frame) -> None:
        if self.stopping is None:
            self.stopping = signum
        elif self._asked:  # a second signal: passed on at once, so the jobs stop now (their last checkpoint stays)
            self.stop_jobs(signum)

    def _forward_stop(self) -> bool:
        """Ask the jobs to stop if a signal came and they were not asked yet; whether they were asked now (wait()
        then returns at once, with no outcome, so the scheduler can say so)."""
        if self.stopping is not None and not self._asked:
            self._asked = True
            self.stop_jobs(self.stopping)
            return True
        return False

    def stop_jobs(self, signum: int) -> None:
        raise NotImplementedError


class LocalProcesses(_ForwardsSignals):
    """Up to `slots` jobs at once, each its own process on this machine."""

    job_module = "ipasdctl.studies.job"  # what each process runs (`python -m`): job.main

    def __init__(self, slots: int, threads: int, gpus: Optional[list[str]] = None):
        self.slots = slots
        self.threads = threads
        self.free_gpus = list(gpus) if gpus else None
        self._running: dict[subprocess.Popen, tuple[Job, Optional[str], Path]] = {}

    def open(self, out: Path) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="ipasdctl-jobs-")
        super().open(out)

    def close(self) -> None:
        try:
            if self._running:  # the scheduler stopped early (an error): stop the jobs with a checkpoint
                self.stop_jobs(signal.SIGTERM)
                for process in self._running:
                    process.wait()
                self._running = {}
        finally:
            super().close()
            self._folder.cleanup()

    def start(self, job: Job) -> None:
        gpu = self.free_gpus.pop(0) if self.free_gpus is not None else None
        folder = Path(self._folder.name) / f"{job.name}.{job.attempt}"
        folder.mkdir()
        atomic_write_text(folder / "spec.json", json.dumps(job_spec(job.run_dir, job.resume, job.recipe, self.threads,
                                                                       env=job.env, trial=job.trial)))
        env = dict(os.environ)
        env["PYTHONPATH"] = _child_pythonpath()
        env["OMP_NUM_THREADS"] = str(self.threads)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(folder / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen([sys.executable, "-m", self.job_module, str(folder / "spec.json"),
                                        str(folder / "result.json")], env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        self._running[process] = (job, gpu, folder)

    def wait(self) -> list[Outcome]:
        while True:
            if self._forward_stop():
                return []
            ended = [process for process in self._running if process.poll() is not None]
            if ended:
                return [self._outcome(process) for process in ended]
            time.sleep(POLL_SECONDS)

    def _outcome(self, process: subprocess.Popen) -> Outcome:
        job, gpu, folder = self._running.pop(process)
        if gpu is not None:
            self.free_gpus.append(gpu)
        seconds = time.monotonic() - job.started
        result = read_json(folder / "result.json")
        if result is not None:
            return Outcome(job, result["status"], result.get("message", ""), bool(result.get("fatal")), seconds,
                           result)
        return Outcome(job, "crashed", _crash_line(process.returncode, folder / "stderr.txt"), seconds=seconds)

    def stop_jobs(self, signum: int) -> None:
        for process in self._running:
            if process.poll() is None:
                process.send_signal(signum)


class RayTasks(_ForwardsSignals):
    """Each job a Ray task (one GPU, or `threads` CPUs) on the cluster at `address` ('local': a Ray instance
    on this machine; 'auto': the cluster this machine belongs to; HOST:PORT). A Ray already initialised in
    this process (ray.init by the caller) is used as it is."""

    def __init__(self, address: str, threads: Optional[int], gpu: bool, default_threads: int = 1):
        try:
            import ray
        except ImportError:
            raise UserError(RAY_MISSING) from None
        self.ray = ray
        self.address = address
        self.threads = threads
        self.default_threads = default_threads
        self.gpu = gpu
        self._running: dict = {}

    def open(self, out: Path) -> None:
        ray = self.ray
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                local = self.address == "local"
                # a local instance's workers import this very code, as the children of --jobs do
                runtime_env = {"env_vars": {"PYTHONPATH": _child_pythonpath()}} if local else None
                ray.init(address=None if local else self.address, include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR", runtime_env=runtime_env)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"--ray {self.address}: cannot connect to a Ray cluster ({one_line(exc, line=0)}); "
                                "start one with `ray start --head`, or use --ray local") from None
        resources = ray.cluster_resources()
        if self.gpu:
            self.slots = int(resources.get("GPU", 0))
            if self.slots < 1:
                raise UserError("the runs are on CUDA but the Ray cluster has no GPUs; add GPU nodes or use "
                                "--device cpu")
        else:
            largest = max([int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
                          or [1])
            if self.threads is None:  # this machine's share, as far as the largest node has it
                self.threads = min(self.default_threads, largest)
            elif self.threads > largest:  # a task no node can hold would wait for ever
                raise UserError(f"--threads-per-job {self.threads}: no node of the Ray cluster has that many CPUs "
                                f"(the largest has {largest}); use --threads-per-job {largest} or fewer")
            self.slots = max(1, int(resources.get("CPU", 1)) // self.threads)
        self.marker = out.resolve() / f".ipasdctl-shared-{uuid.uuid4().hex}"
        atomic_write_text(self.marker, "written by the coordinating `ipasdctl compare` or `tune`; every Ray task checks "
                                       "it sees it\n")
        self._task = ray.remote(run_job)
        super().open(out)

    def close(self) -> None:
        try:
            if self._running:
                self.stop_jobs(signal.SIGINT)
                self.ray.wait(list(self._running), num_returns=len(self._running), timeout=300)
                self._running = {}
        finally:
            super().close()
            self.marker.unlink(missing_ok=True)
            if self._owns:
                self.ray.shutdown()

    def start(self, job: Job) -> None:
        spec = job_spec(job.run_dir, job.resume, job.recipe, self.threads, self.marker, job.env, job.trial)
        options = {"num_gpus": 1, "num_cpus": 1} if self.gpu else {"num_cpus": self.threads}
        self._running[self._task.options(max_retries=0, **options).remote(spec)] = job

    def wait(self) -> list[Outcome]:
        while True:
            if self._forward_stop():
                return []
            ready, _ = self.ray.wait(list(self._running), num_returns=1, timeout=POLL_SECONDS * 5)
            if ready:
                return [self._outcome(ref) for ref in ready]

    def _outcome(self, ref) -> Outcome:
        job = self._running.pop(ref)
        seconds = time.monotonic() - job.started
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            return Outcome(job, "interrupted", "cancelled", seconds=seconds)
        except self.ray.exceptions.RayError as exc:  # the worker or its node died, or an unexpected exception
            return Outcome(job, "crashed", f"the Ray task failed ({one_line(exc, line=0, named=True)})",
                           seconds=seconds)
        return Outcome(job, result["status"], result.get("message", ""), bool(result.get("fatal")), seconds, result)

    def stop_jobs(self, signum: int) -> None:
        for ref in self._running:
            self.ray.cancel(ref)  # a KeyboardInterrupt in the task: the trainer checkpoints and stops


# ------------------------------------------------------------------------------------------------ choice


def visible_gpus(count: int, visible: Optional[str]) -> list[str]:
    """The GPUs of this process as a child's CUDA_VISIBLE_DEVICES names them (index i is the i-th)."""
    if visible is not None and visible.strip():
        return [item.strip() for item in visible.split(",") if item.strip()][:count]
    return [str(index) for index in range(count)]


def choose_gpus(devices: Optional[str], jobs: Optional[int], available: list[str]) -> list[str]:
    """The GPUs the jobs share out, one job each: --devices (indices of the visible GPUs), else all of them."""
    if devices is None or not devices.strip():
        chosen = list(available)
    else:
        chosen = []
        for item in devices.split(","):
            item = item.strip()
            if not item.isdigit() or int(item) >= len(available):
                raise UserError(f"--devices expects comma-separated GPU indices below {len(available)} (this machine "
                                f"sees {len(available)} GPU(s)), got '{devices}'")
            if available[int(item)] not in chosen:
                chosen.append(available[int(item)])
    if not chosen:
        raise UserError("the runs are on CUDA but no GPU is visible; use --device cpu")
    if jobs is not None and jobs > len(chosen):
        raise UserError(f"--jobs {jobs} needs {jobs} GPUs (one per job), {len(chosen)} are given; use --jobs "
                        f"{len(chosen)} or name more with --devices")
    return chosen[:jobs] if jobs is not None else chosen


def make_executor(recipe: Recipe, jobs: Optional[int] = None, devices: Optional[str] = None,
                  threads: Optional[int] = None, ray: Optional[str] = None,
                  progress: Optional[training.Progress] = None) -> Executor:
    """The executor the options ask for: sequential unless --jobs above 1, --devices or --ray."""
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be 1 or more, got {jobs}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads-per-job must be 1 or more, got {threads}")
    if ray is None:  # under Ray the cluster's nodes bound it (RayTasks)
        runtime.check_thread_count("--threads-per-job", threads)
    device = runtime.resolve_device(recipe.train.device)
    cuda = device.type == "cuda"
    parallel = ray is not None or devices is not None or (jobs or 1) > 1
    if parallel and cuda and device.index is not None:
        raise UserError(f"--device {recipe.train.device}: parallel runs give each job its own GPU; use --device "
                        "cuda (and --devices to choose them)")
    if devices is not None and not cuda:
        raise UserError("--devices names GPUs, but the runs are on CPU; leave it out, or use --device cuda")
    if ray is not None and devices is not None:
        raise UserError("--devices is for --jobs on this machine; under --ray, Ray gives each run a GPU")
    if not parallel:
        return Sequential(progress, threads)
    if ray is not None:
        return RayTasks(ray, threads, cuda, max(1, runtime.available_cpus() // (jobs or 1)))
    gpus = None
    if cuda:
        gpus = choose_gpus(devices, jobs, visible_gpus(torch.cuda.device_count(),
                                                           os.environ.get("CUDA_VISIBLE_DEVICES")))
        jobs = len(gpus)
    return LocalProcesses(jobs, threads or max(1, runtime.available_cpus() // jobs), gpus)


def _child_pythonpath() -> str:
    """PYTHONPATH for a job's process: this package's folder first, so the job runs this very code."""
    package_root = str(Path(ipasdctl.__file__).resolve().parent.parent)
    return os.pathsep.join(path for path in (package_root, os.environ.get("PYTHONPATH")) if path)


def _crash_line(code: int, stderr: Path) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its process was killed by {name}"
    try:
        lines = [line for line in stderr.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"its process ended with status {code}" + (f" ({lines[-1].strip()})" if lines else "")
