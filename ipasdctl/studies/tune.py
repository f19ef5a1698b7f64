"""`ipasdctl tune`: an Optuna study of one method on one recipe, maximising the validation top-1.

Each trial samples the search space (studies/space.py), trains an ordinary run folder inside the study folder
with the same code as `train` (training.train_into / training.resume), and reports every epoch's validation
top-1 to the pruner through the trainer's `Progress.epoch_finished` hook; a pruned run stops after that epoch's
checkpoint (studies/trial.py). The value of a trial is its run's best validation top-1 (the epoch best.pt
holds). The recipe must hold out a validation split (`data.val_split`): a search scored on the test set would
flatter its own result. Trials train one after another in this process (Optuna's optimize loop), or on the
executors of `compare` (`--jobs N` processes or GPUs, `--ray ADDRESS` tasks: studies/tune_jobs.py, Optuna's
ask-and-tell), each job reporting to the storage itself.

The study lives in Optuna's storage (SQLite in the study folder unless `--storage` names a database), so a
rerun of the same command continues it until `--trials` trials are counted (complete, pruned, or diverged).
The study folder is locked while `tune` runs in it; so a trial of this folder and host still marked running
is one whose process died (a SIGKILL, a crash): it is marked failed and re-run as a new trial with the same
parameters in the same run folder, which resumes from its last checkpoint; a finished run is never trained
again (its value is read back from its summary). A trial stopped by SIGINT/SIGTERM is re-run the same way.
"""

from __future__ import annotations

import math
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from .. import training
from ..config import ResolvedRecipe, differing_keys, recipe_from_dict
from ..errors import UserError
from ..safe_io import atomic_write_text
from ..runs import RunFolder, StudyFolder, trial_run_name
from ..yaml_files import read_yaml_file
from . import space as spaces
from . import tune_jobs
from .executors import Executor, RayTasks, Sequential
from .trial import TUNE_MISSING  # noqa: F401  (re-exported: the message callers match)
from .trial import TrialDiverged, import_optuna, make_pruner, open_storage, shown_url, train_reporting
from .tune_outputs import counted, write_outputs

PRUNERS = ("median", "halving", "none")


def say_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TuneSettings:
    trials: int
    out: Optional[Path] = None  # default: studies/<recipe name>-<method>
    space: Optional[Path] = None  # --space FILE; None: the method's declared ranges, optim.lr, optim.weight_decay
    storage: Optional[str] = None  # an Optuna storage URL; None: SQLite in the study folder
    pruner: str = "median"
    startup_trials: int = 2  # trials finished before the pruner may stop one
    warmup_epochs: Optional[int] = None  # epochs a trial always runs before it may be pruned (None: warmup_for)

    def check(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise UserError(f"--trials must be a positive integer, got {self.trials}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{self.pruner}'")

    def warmup_for(self, recipe: ResolvedRecipe) -> int:
        """Epochs a trial runs before the pruner may stop it: `warmup_epochs`, or by default a third of a trial's
        epochs, and at least one epoch past the lr warm-up. The ranking of trials in their first epochs (under
        warm-up, at the highest lr) says little about where they end: with the pruner free from epoch 1, 8 of
        10 trials of a ce study on CIFAR-10 were stopped after epoch 1 at 10-23 % val top-1, one of them beside
        the best trial's parameters (docs/regimes.md (g))."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return max(math.ceil(recipe.optim.warmup_epochs) + 1, math.ceil(recipe.train.epochs / 3))


def default_out(recipe: ResolvedRecipe) -> Path:
    return Path("studies") / f"{recipe.name}-{recipe.method['name']}"


def check_recipe(recipe: ResolvedRecipe) -> None:
    if not recipe.data.val_split:
        raise UserError(f"tune needs a validation split to score trials on, and recipe '{recipe.name}' holds none: "
                        "add --set data.val_split=N (N training images held out); scoring on the test set would "
                        "flatter the tuned result")


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


def open_study(study: Study) -> None:
    optuna = study.optuna
    s = study.settings
    url = study.storage_url
    storage = open_storage(optuna, url)
    pruner = make_pruner(optuna, s.pruner, s.startup_trials, s.warmup_for(study.recipe))
    created = optuna.create_study(storage=storage, study_name=study.name, direction="maximize", load_if_exists=True,
                                  pruner=pruner)
    done = len(created.get_trials(deepcopy=False))
    # reseeded past the trials already run: a continued study does not sample its first trials again
    # constant liar: trials in flight together (--jobs, --ray) count as bad so far, so TPE samples elsewhere
    # (Optuna 5's default, spelled out for Optuna 4)
    sampler = optuna.samplers.TPESampler(seed=study.recipe.train.seed + done,
                                         n_startup_trials=min(10, max(2, s.trials // 3)), constant_liar=True)
    study.study = optuna.load_study(storage=storage, study_name=study.name, sampler=sampler, pruner=pruner)
    recorded = study.study.user_attrs.get("recipe")
    if recorded is not None:
        diff = differing_keys(training.resolved_dict(recorded), study.recipe.to_dict())
        if diff:
            raise UserError(f"study '{study.name}' in {shown_url(url)} was run with another recipe (differs in "
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


def begin_trial(study: Study, trial) -> tuple[RunFolder, ResolvedRecipe]:
    """This process's side of a trial's start, wherever it trains: its run folder (a re-run's is the failed
    trial's), its parameters sampled, its recipe resolved (a UserError, recorded on the trial, for values that
    do not go together)."""
    run_name = trial.user_attrs.get("run") or trial_run_name(trial.number)
    trial.set_user_attr("run", run_name)
    trial.set_user_attr("folder", str(study.folder.path.resolve()))
    trial.set_user_attr("host", study.host)
    params = {d.key: d.suggest(trial) for d in study.dims}
    try:
        recipe = training.resolve_recipe(spaces_recipe(study.recipe, params))
    except UserError as exc:
        trial.set_user_attr("error", str(exc))
        raise
    return study.folder.run(run_name), recipe


def objective_of(study: Study, progress_enabled: bool) -> Callable:
    def objective(trial) -> float:
        folder, recipe = begin_trial(study, trial)
        return train_reporting(trial, study.optuna, recipe, folder, progress_enabled)

    return objective


def spaces_recipe(recipe: ResolvedRecipe, params: dict):
    return recipe_from_dict(spaces.apply(recipe, params))


def say_progress(study: Study, say: Callable[[str], None], session_trials: list, slots: int = 1) -> Callable:
    """The line per trial that ended with an answer; the time left is the mean trial time of this session
    times the trials left, shared over the executor's slots."""
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
        eta = f", about {_duration(per_trial * left / min(max(slots, 1), left))} left" if left else ""
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
        say: Optional[Callable[[str], None]] = None, executor: Optional[Executor] = None) -> Path:
    """Carry out (or continue) the study until `settings.trials` trials are counted; write trials.csv,
    best.yaml, summary.md and the plots; returns the study folder. `executor` (studies/executors.make_executor:
    `--jobs`, `--ray`): where the trials train; default (or Sequential) one after another in this process."""
    say = say or (lambda message: None)
    executor = executor or Sequential()
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
            write_outputs(study)
        else:
            try:
                _open(executor, study, say)
            except UserError:
                if created:
                    lock.release()
                    _remove_empty(folder)
                raise
            where = "" if isinstance(executor, Sequential) else f", up to {executor.slots} at once"
            say(f"{folder.path}: {remaining} trials to run{where}; space: {'; '.join(d.describe() for d in dims)}")
            try:
                _carry_out(study, executor, remaining, progress_enabled, say)
            finally:  # the outputs of every trial that ended, whatever ended the session
                executor.close()
                write_outputs(study)
    finally:
        lock.release()
    return folder.path


def _open(executor: Executor, study: Study, say: Callable[[str], None]) -> None:
    executor.open(study.folder.path)  # Ray: connects (a one-line error when it cannot) and writes its marker
    if isinstance(executor, RayTasks) and executor.address != "local" and study.settings.storage is None:
        say(f"note: the trials write to {study.folder.database.name} (SQLite) through the shared file system; "
            "with Ray nodes on several machines give --storage a database server (postgresql://...)")


def _carry_out(study: Study, executor: Executor, remaining: int, progress_enabled: bool, say: Callable) -> None:
    session: list = []
    line = say_progress(study, say, session, executor.slots)
    if not isinstance(executor, Sequential):
        tune_jobs.carry_out(study, executor, lambda trial: begin_trial(study, trial), line, say)
        return
    before = torch.get_num_threads()
    if executor.threads:  # --threads-per-job without --jobs: this process's thread count
        torch.set_num_threads(executor.threads)
    try:
        study.study.optimize(objective_of(study, progress_enabled), n_trials=remaining, catch=(TrialDiverged,),
                             callbacks=[line])
    finally:
        torch.set_num_threads(before)


def _remove_empty(folder: StudyFolder) -> None:
    try:
        for child in folder.path.iterdir():
            child.unlink()
        folder.path.rmdir()
    except OSError:
        pass

