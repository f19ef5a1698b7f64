"""`ipasdctl tune`: an Optuna study of one method on one recipe, maximising the validation top-1.

Each trial samples the search space (studies/space.py), trains an ordinary run folder inside the study folder
with the same code as `train` (training.train_into / training.resume), and reports every epoch's validation
top-1 to the pruner through the trainer's `Progress.epoch_finished` hook; a pruned run stops after that epoch's
checkpoint. The value of a trial is its run's best validation top-1 (the epoch best.pt holds). The recipe must
hold out a validation split (`data.val_split`): a search scored on the test set would flatter its own result.

The study lives in Optuna's storage (SQLite in the study folder unless `--storage` names a database), so a
rerun of the same command continues it until `--trials` trials are counted (complete, pruned, or diverged).
The study folder is locked while `tune` runs in it; so a trial of this folder and host still marked running
is one whose process died (a SIGKILL, a crash): it is marked failed and re-run as a new trial with the same
parameters in the same run folder, which resumes from its last checkpoint; a finished run is never trained
again (its value is read back from its summary). A trial stopped by SIGINT/SIGTERM is re-run the same way.
"""

from __future__ import annotations

import csv
import math
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from .. import training
from ..config import ResolvedRecipe, differing_keys, recipe_from_dict
from ..errors import UserError, one_line
from ..safe_io import atomic_write_text
from ..runs import RunFolder, StudyFolder, trial_run_name
from ..yaml_files import read_yaml_file
from . import space as spaces
from .tune_outputs import counted, write_outputs

TUNE_MISSING = "tune needs Optuna, which is not installed; install it with: pip install 'ipasdctl[tune]'"
PRUNERS = ("median", "halving", "none")


def say_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(TUNE_MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says what happened
    return optuna


@dataclass
class TuneSettings:
    trials: int
    out: Optional[Path] = None  # default: studies/<recipe name>-<method>
    space: Optional[Path] = None  # --space FILE; None: the method's declared ranges, optim.lr, optim.weight_decay
    storage: Optional[str] = None  # an Optuna storage URL; None: SQLite in the study folder
    pruner: str = "median"
    startup_trials: int = 2  # trials finished before the pruner may stop one
    warmup_epochs: int = 1  # epochs a trial always runs before it may be pruned

    def check(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise UserError(f"--trials must be a positive integer, got {self.trials}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{self.pruner}'")


class TrialDiverged(Exception):
    """A trial's training failed after its first checkpoint (a non-finite loss): a bad trial, not bad input."""


def default_out(recipe: ResolvedRecipe) -> Path:
    return Path("studies") / f"{recipe.name}-{recipe.method['name']}"


def check_recipe(recipe: ResolvedRecipe) -> None:
    if not recipe.data.val_split:
        raise UserError(f"tune needs a validation split to score trials on, and recipe '{recipe.name}' holds none: "
                        "add --set data.val_split=N (N training images held out); scoring on the test set would "
                        "flatter the tuned result")


# ------------------------------------------------------------------------------------------------ the trial


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


# ------------------------------------------------------------------------------------------------ the study


@dataclass
class Study:
    """A study being carried out: its folder, recipe, space, the Optuna study."""

    folder: StudyFolder
    recipe: ResolvedRecipe
    dims: list
    settings: TuneSettings
    study: object = None
    optuna: object = None
    host: str = field(default_factory=socket.gethostname)

    @property
    def method(self) -> str:
        return self.recipe.method["name"]

    @property
    def name(self) -> str:
        return f"{self.recipe.name}-{self.method}"

    @property
    def storage_url(self) -> str:
        return self.settings.storage or self.folder.default_storage

    def record(self) -> dict:
        """What study.yaml holds (and the Optuna study's user attribute `recipe`)."""
        return {"study_name": self.name, "method": self.method, "recipe": self.recipe.to_dict(),
                "space": [d.to_dict() for d in self.dims], "trials": self.settings.trials,
                "pruner": self.settings.pruner, "storage": self.settings.storage or "study.db (in this folder)"}

    def ours(self, trial) -> bool:
        """A trial this folder on this host ran (a shared database holds other machines' trials too)."""
        return trial.user_attrs.get("folder") == str(self.folder.path.resolve()) and \
            trial.user_attrs.get("host") == self.host


def _refuse_other_study(folder: StudyFolder, record: dict) -> None:
    if not folder.record.is_file():
        return
    previous = read_yaml_file(folder.record, str(folder.record), "remove it or choose another --out") or {}
    if not isinstance(previous, dict):
        raise UserError(f"{folder.record} is not a study record (a mapping); remove it or choose another --out")
    if previous.get("method") != record["method"]:
        raise UserError(f"{folder.path} holds a study of method {previous.get('method')}, not {record['method']}; "
                        "choose another --out for this method")
    diff = differing_keys(training.resolved_dict(previous.get("recipe") or {}), record["recipe"])
    if diff:
        raise UserError(f"{folder.path} holds a study of another recipe (differs in {', '.join(diff[:5])}); rerun "
                        "with the same recipe options or choose another --out")


def _shown_url(url: str) -> str:
    """The storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL at all: it is shown as given (and refused below)
        return url


def open_study(study: Study) -> None:
    optuna = study.optuna
    s = study.settings
    url = study.storage_url
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as exc:  # a bad URL, an unreachable server, a missing driver: all one line
        raise UserError(f"cannot open the study storage {_shown_url(url)}: {one_line(exc, 200)}; give a database "
                        "URL Optuna accepts, e.g. sqlite:///path/study.db or postgresql://user@host/db") from None
    if s.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.warmup_epochs)
    elif s.pruner == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(s.warmup_epochs, 1), reduction_factor=3)
    else:
        pruner = optuna.pruners.NopPruner()
    created = optuna.create_study(storage=storage, study_name=study.name, direction="maximize", load_if_exists=True,
                                  pruner=pruner)
    done = len(created.get_trials(deepcopy=False))
    # reseeded past the trials already run: a continued study does not sample its first trials again
    sampler = optuna.samplers.TPESampler(seed=study.recipe.train.seed + done,
                                         n_startup_trials=min(10, max(2, s.trials // 3)))
    study.study = optuna.load_study(storage=storage, study_name=study.name, sampler=sampler, pruner=pruner)
    recorded = study.study.user_attrs.get("recipe")
    if recorded is not None:
        diff = differing_keys(training.resolved_dict(recorded), study.recipe.to_dict())
        if diff:
            raise UserError(f"study '{study.name}' in {_shown_url(url)} was run with another recipe (differs in "
                            f"{', '.join(diff[:5])}); use the same recipe options or another --storage")
    else:
        study.study.set_user_attr("recipe", study.recipe.to_dict())


def recover(study: Study) -> list[str]:
    """Trials of this folder left running by a dead process are marked failed; every failed trial that was not
    a bad input (nor a diverged run) gets one re-run with its parameters in its run folder. Returns notes."""
    optuna = study.optuna
    TrialState = optuna.trial.TrialState
    notes = []
    for trial in study.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if study.ours(trial):
            study.study.tell(trial.number, state=TrialState.FAIL)
            notes.append(f"trial {trial.number} was left running by a process that ended; it is re-run")
    trials = study.study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    searched = {d.key for d in study.dims if d.low is not None or d.choices is not None}
    for trial in trials:
        if trial.state == TrialState.FAIL and study.ours(trial) and trial.number not in retried \
                and not trial.user_attrs.get("error"):
            if set(trial.params) != searched:  # the space changed since: its run is of another recipe now
                notes.append(f"trial {trial.number} ran in another space; it stays failed, not re-run")
                continue
            study.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                                "run": trial.user_attrs.get("run")})
    return notes


def objective_of(study: Study, progress_enabled: bool) -> Callable:
    optuna = study.optuna

    def objective(trial) -> float:
        run_name = trial.user_attrs.get("run") or trial_run_name(trial.number)
        trial.set_user_attr("run", run_name)
        trial.set_user_attr("folder", str(study.folder.path.resolve()))
        trial.set_user_attr("host", study.host)
        params = {d.key: d.suggest(trial) for d in study.dims}
        folder = study.folder.run(run_name)
        try:
            recipe = training.resolve_recipe(spaces_recipe(study.recipe, params))
            progress = TrialProgress(trial, optuna, progress_enabled)
            for epoch, val in earlier_epochs(folder):  # a resumed run's epochs so far, for the pruner
                report(trial, optuna, epoch, val)
            return train_trial(recipe, folder, progress)
        except UserError as exc:
            trial.set_user_attr("error", str(exc))
            if folder.last.is_file():  # it trained, then failed (a non-finite loss): a bad trial
                trial.set_user_attr("diverged", True)
                raise TrialDiverged(str(exc)) from None
            raise

    return objective


def spaces_recipe(recipe: ResolvedRecipe, params: dict):
    return recipe_from_dict(spaces.apply(recipe, params))


def say_progress(study: Study, say: Callable[[str], None], session_trials: list) -> Callable:
    target = study.settings.trials

    def line(_study, frozen) -> None:
        session_trials.append(frozen.duration.total_seconds() if frozen.duration else 0.0)
        trials = study.study.get_trials(deepcopy=False)
        done = sum(counted(t) for t in trials)
        state = frozen.state.name.lower()
        epochs = len(frozen.intermediate_values)
        value = frozen.value if frozen.value is not None else (
            frozen.intermediate_values[max(frozen.intermediate_values)] if frozen.intermediate_values else None)
        shown = f"val top-1 {value:.2f} %" if value is not None else frozen.user_attrs.get("error", "no value")[:80]
        best = _best(study)
        best_text = f"best {best.value:.2f} % (trial {best.number})" if best is not None else "no best yet"
        left = max(target - done, 0)
        per_trial = sum(session_trials) / len(session_trials)
        eta = f", about {_duration(per_trial * left)} left" if left else ""
        say(f"trial {frozen.number} {state} ({done}/{target}): {shown} after {epochs} epochs in "
            f"{_duration(session_trials[-1])}; {best_text}; {left} to go{eta}")

    return line


def _best(study: Study):
    complete = [t for t in study.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: t.value) if complete else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run(recipe: ResolvedRecipe, settings: TuneSettings, progress_enabled: bool = True,
        say: Optional[Callable[[str], None]] = None) -> Path:
    """Carry out (or continue) the study until `settings.trials` trials are counted; write trials.csv,
    best.yaml, summary.md and the plots; returns the study folder."""
    say = say or (lambda message: None)
    settings.check()
    check_recipe(recipe)
    optuna = import_optuna()
    dims = spaces.space_of(recipe, settings.space)
    folder = StudyFolder(settings.out if settings.out is not None else default_out(recipe))
    study = Study(folder, recipe, dims, settings, optuna=optuna)
    if folder.path.is_file():
        raise UserError(f"--out {folder.path} is a file; give a folder for the study")
    _refuse_other_study(folder, study.record())
    created = not folder.path.exists()
    try:
        folder.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create study folder {folder.path}: {exc.strerror}; choose a writable --out") from None
    lock = folder.lock()
    lock.acquire()
    try:
        try:
            open_study(study)
        except UserError:
            if created:
                lock.release()
                _remove_empty(folder)
            raise
        atomic_write_text(folder.record, yaml.safe_dump(study.record(), sort_keys=False))
        for note in recover(study):
            say(note)
        remaining = settings.trials - sum(counted(t) for t in study.study.get_trials(deepcopy=False))
        if remaining <= 0:
            say(f"{folder.path}: {settings.trials} trials done already; nothing to run")
        else:
            say(f"{folder.path}: {remaining} trials to run; space: {'; '.join(d.describe() for d in dims)}")
            session: list = []
            try:
                study.study.optimize(objective_of(study, progress_enabled), n_trials=remaining,
                                     catch=(TrialDiverged,),
                                     callbacks=[say_progress(study, say, session)])
            finally:
                write_outputs(study)
        write_outputs(study)
    finally:
        lock.release()
    return folder.path


def _remove_empty(folder: StudyFolder) -> None:
    try:
        for child in folder.path.iterdir():
            child.unlink()
        folder.path.rmdir()
    except OSError:
        pass

