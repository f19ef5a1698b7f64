"""The coordinator of a comparison's runs, whatever executes them: which run starts when, what becomes of each,
and the lines the user sees.

- Runs start in plan order as the executor has slots; a run that needs another (`needs`: tf-kd-self needs the
  ce run of its seed) waits until that one has finished, and fails without training if that one failed.
- A finished run is skipped, an interrupted one resumed, a leftover folder without a checkpoint trained anew.
- A run whose job crashed (killed, a traceback, a lost worker or node) is tried once more, resuming from its
  last checkpoint; then it is reported failed, and the other runs go on. A one-line user error is not retried
  (it would fail again). A fatal outcome (a node without the shared --out) ends the comparison.
- SIGINT/SIGTERM (executors that run jobs elsewhere forward it): no new job starts, every running job writes
  its checkpoint, then Interrupted is raised; the same command resumes.
- One line per finished run, with runs done/total and the time left, estimated from the finished runs.

Test hook: IPASDCTL_TEST_SIGNAL_RUN="NAME=N[:SIGNAL]" gives the first attempt of run NAME (only) the trainer's
IPASDCTL_TEST_SIGNAL_AT_STEP="N[:SIGNAL]" (training/stopping.py); executors that run jobs in this process
ignore it.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Optional

from .. import training
from ..analysis.tables import count_noun
from ..errors import UserError
from ..runs import RunFolder, RunSummary
from ..training.progress import duration
from ..training.stopping import TEST_SIGNAL_ENV
from .executors import Executor, Job, Outcome

TEST_SIGNAL_RUN_ENV = "IPASDCTL_TEST_SIGNAL_RUN"
ATTEMPTS = 2  # a crashed run is tried once more


class RunsFailed(UserError):
    """Some runs failed after their retry; the others finished and are in the tables."""

    exit_code = 1


class Eta:
    """Runs done out of the total, and the time left: the mean time of the runs trained by this command, times
    the runs left, shared over the executor's slots."""

    def __init__(self, total: int, slots: int):
        self.total, self.slots = total, max(1, slots)
        self.done = 0
        self.seconds: list[float] = []

    def finished(self, seconds: Optional[float] = None) -> None:
        self.done += 1
        if seconds is not None:
            self.seconds.append(seconds)

    def line(self) -> str:
        left = self.total - self.done
        text = f"{self.done}/{self.total} runs done"
        if left > 0 and self.seconds:
            mean = sum(self.seconds) / len(self.seconds)
            text += f", about {duration(mean * left / min(self.slots, left))} left"
        return text


def _accuracy(summary: RunSummary) -> str:
    best, last = (float("nan") if value is None else value for value in (summary.best_top1, summary.last_top1))
    return f"best-epoch top-1 {best:.2f}%, last-epoch {last:.2f}%"


def remove_partial(run_dir) -> None:
    """A folder without a checkpoint holds nothing worth keeping, unless another process is writing it."""
    lock = RunFolder(run_dir).lock()
    lock.acquire()  # a UserError when a live process holds the run
    lock.release()
    shutil.rmtree(run_dir)


def _test_signals() -> dict[str, str]:
    value = os.environ.get(TEST_SIGNAL_RUN_ENV, "")
    name, _, at = value.partition("=")
    return {name: at} if name and at else {}


def carry_out(runs: list, executor: Executor, say: Callable[[str], None], needs: dict[str, str],
              after_each: Optional[Callable[[dict[str, str]], None]] = None) -> dict[str, str]:
    """Train, resume or skip every planned run (objects with name, method, seed, run_dir, recipe) through
    `executor`; call `after_each(failed)` whenever a run has finished or failed, and once at the end. Returns
    the failed runs' names and reasons. Raises training.Interrupted after a stop signal (every job stopped)."""
    total = len(runs)
    numbers = {planned.name: number for number, planned in enumerate(runs, 1)}
    by_name = {planned.name: planned for planned in runs}
    pending = list(runs)
    done: set[str] = set()
    failed: dict[str, str] = {}
    attempts: dict[str, int] = {}
    running: set[str] = set()
    eta = Eta(total, executor.slots)
    test_signals = _test_signals()

    def head(name: str) -> str:
        return f"[{numbers[name]}/{total}] {name}:"

    def changed() -> None:
        if after_each is not None:
            after_each(dict(failed))

    def fail(name: str, reason: str) -> None:
        failed[name] = reason
        eta.finished()
        say(f"{head(name)} failed: {reason}")
        changed()

    def launch() -> None:
        for planned in list(pending):
            need = needs.get(planned.name)
            if need in failed:
                pending.remove(planned)
                fail(planned.name, f"not trained: the run it needs, {need}, failed")
                continue
            if need is not None and need not in done:
                continue  # waits for its reference run
            folder = RunFolder(planned.run_dir)
            state = folder.state()
            if state == "finished" and planned.name not in attempts:
                pending.remove(planned)
                done.add(planned.name)
                eta.finished()
                say(f"{head(planned.name)} finished, skipped ({_accuracy(folder.read_summary())})")
                continue
            if len(running) >= executor.slots:
                break
            pending.remove(planned)
            attempt = attempts[planned.name] = attempts.get(planned.name, 0) + 1
            epochs = planned.recipe.train.epochs
            if state == "resumable":
                say(f"{head(planned.name)} resuming after epoch {folder.epochs_done()}/{epochs}")
            else:
                if planned.run_dir.exists():
                    remove_partial(planned.run_dir)
                say(f"{head(planned.name)} training {planned.method}, seed {planned.seed}, {count_noun(epochs, 'epoch')}")
            env = {TEST_SIGNAL_ENV: test_signals[planned.name]} if attempt == 1 and planned.name in test_signals else {}
            job = Job(planned.name, planned.run_dir, state == "resumable", planned.recipe, attempt, env,
                      started=time.monotonic())
            running.add(planned.name)
            executor.start(job)

    def settle(outcome: Outcome) -> None:
        name = outcome.job.name
        running.discard(name)
        if outcome.fatal:
            raise UserError(outcome.message)
        status, message = outcome.status, outcome.message
        if status == "finished":
            summary = RunFolder(by_name[name].run_dir).read_summary()
            if summary is None or not summary.finished:
                status, message = "crashed", "it ended without a finished summary.json"
            else:
                done.add(name)
                eta.finished(outcome.seconds)
                say(f"{head(name)} finished in {duration(outcome.seconds)} ({_accuracy(summary)}); {eta.line()}")
                changed()
                return
        if executor.stopping is not None:  # stopped by the user (a second signal may have cut it short)
            pending.insert(0, by_name[name])  # resumed by the next `compare`
            return
        if status == "error":
            fail(name, message)
        elif outcome.job.attempt < ATTEMPTS:
            where = "its last checkpoint" if RunFolder(by_name[name].run_dir).last.is_file() else "the start"
            say(f"{head(name)} {message}; trying once more from {where}")
            pending.insert(0, by_name[name])
        else:
            fail(name, f"{message} (attempt {outcome.job.attempt} of {ATTEMPTS})")

    try:
        executor.drive(launch, settle, running, "running job", say, runs[0].run_dir.parent)
    except training.Interrupted:
        changed()  # the tables of a stopped comparison, as of a finished one (not after an error)
        raise
    changed()
    return failed
