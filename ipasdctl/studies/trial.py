"""One trial of a tuning study, wherever it trains: inside `tune` (the sequential study, studies/tune.py) or in a
job of an executor (`tune --jobs N`, `--ray`: studies/tune_jobs.py hands it out, studies/job.py runs it).

Either way the trial trains an ordinary run folder with the code of `train` and reports every epoch's
validation top-1 to the Optuna storage from the process that trains it, where the pruner decides, from every
trial the storage holds, whether to stop it (after that epoch's checkpoint: the run stays resumable). A job
opens the study's storage itself (its URL is in the job's spec): SQLite handles the processes of one machine;
trials on several machines need a database server (`--storage postgresql://...`).
"""

from __future__ import annotations

import csv
import math
import os
import socket
from pathlib import Path
from typing import Optional

from .. import training
from ..config import ResolvedRecipe, recipe_from_dict
from ..errors import UserError, one_line
from ..runs import RunFolder

TUNE_MISSING = "tune needs Optuna, which is not installed; install it with: pip install 'ipasdctl[tune]'"
SQLITE_WAIT_SECONDS = 60  # several processes write one SQLite file: each waits its turn this long


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(TUNE_MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says what happened
    return optuna


class TrialDiverged(Exception):
    """A trial's training failed after its first checkpoint (a non-finite loss): a bad trial, not bad input."""


def shown_url(url: str) -> str:
    """The storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL at all: it is shown as given (and refused by open_storage)
        return url


def open_storage(optuna, url: str):
    """The Optuna storage at `url`; one line naming it when it cannot be opened."""
    engine = {"connect_args": {"timeout": SQLITE_WAIT_SECONDS}} if url.startswith("sqlite:") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # a bad URL, an unreachable server, a missing driver: all one line
        raise UserError(f"cannot open the study storage {shown_url(url)}: {one_line(exc, 200)}; give a database "
                        "URL Optuna accepts, e.g. sqlite:///path/study.db or postgresql://user@host/db") from None


def make_pruner(optuna, name: str, startup_trials: int, warmup_epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(warmup_epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def worker_name() -> str:
    """Which process trains a trial: host:pid (trials.csv's `worker`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------------------------ training


class TrialProgress(training.Progress):
    """The trainer's progress, reporting each epoch's validation top-1 to the trial and stopping a trial the
    pruner gives up on (after the epoch's checkpoint: the run stays resumable)."""

    def __init__(self, trial, optuna, enabled: bool):
        super().__init__(enabled=enabled)
        self.trial, self.optuna = trial, optuna

    def epoch_finished(self, row: dict) -> None:
        report(self.trial, self.optuna, int(row["epoch"]), row.get("val_top1"))


def report(trial, optuna, epoch: int, val_top1) -> None:
    if val_top1 is None or not math.isfinite(float(val_top1)):
        return
    trial.report(float(val_top1), epoch)
    if trial.should_prune():
        trial.set_user_attr("pruned_at", epoch)
        raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def earlier_epochs(folder: RunFolder) -> list[tuple[int, Optional[float]]]:
    """(epoch, val top-1) of the epochs a run folder's metrics.csv records (a run resumed or read back)."""
    if not folder.metrics.is_file():
        return []
    with folder.metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(int(float(r["epoch"])), float(r["val_top1"]) if r.get("val_top1") not in (None, "") else None)
            for r in rows if r.get("epoch")]


def train_trial(recipe: ResolvedRecipe, folder: RunFolder, progress: training.Progress) -> float:
    """Train (or resume, or read back) the trial's run; its best validation top-1."""
    state = folder.state()
    if state == "resumable" or state == "finished":
        training.resume(folder.path, recipe, progress)  # a finished run: nothing trains
    else:
        if folder.path.exists():
            folder.remove_partial(created=True)  # killed before its first checkpoint: start it again
        training.train_into(recipe, folder.path, progress)
    summary = folder.read_summary()
    if summary is None or summary.best_val_top1 is None:
        raise UserError(f"{folder.path} finished without a validation top-1; is data.val_split set?")
    return float(summary.best_val_top1)


def train_reporting(trial, optuna, recipe: ResolvedRecipe, folder: RunFolder, progress_enabled: bool) -> float:
    """The trial's run trained (resumed, read back) with every epoch reported to the pruner, the epochs of an
    earlier attempt first; its best validation top-1. Raises TrialPruned, TrialDiverged, UserError."""
    trial.set_user_attr("worker", worker_name())
    try:
        for epoch, val in earlier_epochs(folder):
            report(trial, optuna, epoch, val)
        return train_trial(recipe, folder, TrialProgress(trial, optuna, progress_enabled))
    except UserError as exc:
        trial.set_user_attr("error", str(exc))
        if folder.last.is_file():  # it trained, then failed (a non-finite loss): a bad trial
            trial.set_user_attr("diverged", True)
            raise TrialDiverged(str(exc)) from None
        raise


# ------------------------------------------------------------------------------------------------ in a job


def trial_spec(storage: str, study_name: str, number: int, pruner: str, startup_trials: int,
               warmup_epochs: int) -> dict:
    """What a job needs to find its trial and judge it as the coordinator's pruner does (plain data: it
    crosses a process or a machine)."""
    return {"storage": storage, "study_name": study_name, "number": number, "pruner": pruner,
            "startup_trials": startup_trials, "warmup_epochs": warmup_epochs}


def run_trial(spec: dict) -> dict:
    """A job's trial (studies/job.py: its run_dir, recipe and `trial` spec): trained reporting to the storage;
    its result: finished (with `value`), pruned, diverged, error, interrupted. The coordinator tells Optuna."""
    found = spec["trial"]
    optuna = import_optuna()
    try:
        storage = open_storage(optuna, found["storage"])
    except UserError as exc:  # every job of this machine would fail the same way
        return {"status": "error", "message": str(exc), "fatal": True}
    pruner = make_pruner(optuna, found["pruner"], found["startup_trials"], found["warmup_epochs"])
    study = optuna.load_study(study_name=found["study_name"], storage=storage, pruner=pruner,
                              sampler=optuna.samplers.RandomSampler())  # it never samples: its parameters are set
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(found["study_name"]),
                                                               found["number"])
    trial = optuna.trial.Trial(study, trial_id)
    folder = RunFolder(Path(spec["run_dir"]))
    try:
        value = train_reporting(trial, optuna, recipe_from_dict(spec["recipe"]), folder, progress_enabled=False)
    except optuna.TrialPruned as exc:
        return {"status": "pruned", "message": str(exc), "fatal": False}
    except TrialDiverged as exc:
        return {"status": "diverged", "message": str(exc), "fatal": False}
    except UserError as exc:
        return {"status": "error", "message": str(exc), "fatal": False}
    except training.Interrupted as exc:
        return {"status": "interrupted", "message": f"stopped with a checkpoint (status {exc.code})", "code": exc.code,
                "fatal": False}
    return {"status": "finished", "value": value, "message": "", "fatal": False}
