"""The trials of a study spread over an executor (`tune --jobs N`, `tune --ray ADDRESS`; studies/executors.py):
Optuna's ask-and-tell with up to `slots` trials in flight.

This process asks the sampler for a trial (a trial waiting to be re-run first), samples its parameters and
resolves its recipe (`begin`, studies/tune.py), and hands the trial's run to the executor as a job; the job's
process trains it and reports each epoch's validation top-1 to the study's storage itself, where the pruner
decides (studies/trial.py); this process tells Optuna each trial's end as its job ends. The sequential study's
guarantees hold here too:

- trials start while the counted trials (complete, pruned, diverged) and those in flight are fewer than
  `--trials`, so a study ends with exactly that many counted, however many jobs run;
- a trial whose job crashed (SIGKILL, a traceback, a lost worker or node) is failed and re-run once as a new
  trial with its parameters in its run folder, resuming from its last checkpoint; a re-run that crashes
  again starts no new trial (the study ends with an error; a rerun of the command tries again);
- a trial with bad input (a one-line error) starts no new trial either: the running ones finish, then the
  error is raised, as the sequential study raises it;
- SIGINT/SIGTERM: every job writes its checkpoint, its trial is failed (the next `tune` re-runs it, as it
  re-runs one left running by a dead process), then Interrupted is raised;
- a finished run is never trained again: the job reads its value back from the run folder.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from ..errors import UserError
from ..runs import trial_run_name
from .executors import Executor, Job, Outcome
from .trial import trial_spec
from .tune_outputs import counted


class TrialCrashedTwice(UserError):
    """A trial's re-run crashed too: not bad input, yet the study cannot go on by itself (exit status 1)."""

    exit_code = 1


def carry_out(study, executor: Executor, begin: Callable, finished: Callable, say: Callable[[str], None]) -> None:
    """Run trials of `study` (studies/tune.Study, opened) through `executor` (opened on the study folder) until
    `--trials` are counted. `begin(trial)`: the trial's run folder and resolved recipe; `finished(study,
    frozen)`: the progress line of a trial that ended with an answer."""
    optuna = study.optuna
    TrialState = optuna.trial.TrialState
    settings = study.settings
    running: dict[str, object] = {}  # job name -> the trial it trains
    problem: Optional[UserError] = None  # no new trial starts; raised once the running ones have ended

    def counted_now() -> int:
        return sum(counted(t) for t in study.study.get_trials(deepcopy=False))

    def start_trials() -> None:
        nonlocal problem
        while len(running) < executor.slots and counted_now() + len(running) < settings.trials:
            trial = study.study.ask()  # a trial waiting to be re-run comes first
            try:
                folder, recipe = begin(trial)
            except UserError as exc:
                study.study.tell(trial, state=TrialState.FAIL)
                problem = exc
                return
            spec = trial_spec(study.storage_url, study.name, trial.number, settings.pruner,
                              settings.startup_trials, settings.warmup_for(study.recipe))
            job = Job(trial_run_name(trial.number), folder.path, folder.state() == "resumable", recipe,
                      started=time.monotonic(), trial=spec)
            running[job.name] = trial
            executor.start(job)

    def settle(outcome: Outcome) -> None:
        nonlocal problem
        trial = running.pop(outcome.job.name)
        status, message = outcome.status, outcome.message
        if outcome.fatal:  # a worker without the shared study folder or storage: every trial would fail there
            study.study.tell(trial, state=TrialState.FAIL)
            raise UserError(message)
        if status == "finished":
            finished(study.study, study.study.tell(trial, float(outcome.result["value"])))
        elif status == "pruned":
            finished(study.study, study.study.tell(trial, state=TrialState.PRUNED))
        elif status == "diverged":  # a bad trial, counted: its job recorded the error
            finished(study.study, study.study.tell(trial, state=TrialState.FAIL))
        elif status == "error":  # bad input: the job recorded it on the trial, which is not re-run
            study.study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number} failed: {message}")
            problem = problem or UserError(message)
        elif status == "interrupted" or executor.stopping is not None:
            study.study.tell(trial, state=TrialState.FAIL)  # re-run by the next `tune`, from its checkpoint
        else:
            crashed(trial, message)

    def crashed(trial, message: str) -> None:
        nonlocal problem
        trial.set_user_attr("crash", message)
        study.study.tell(trial, state=TrialState.FAIL)
        first = trial.user_attrs.get("retry_of")
        if first is not None:
            say(f"trial {trial.number} (a re-run of trial {first}) failed again: {message}; no new trial starts")
            problem = problem or TrialCrashedTwice(f"trial {trial.number} crashed twice ({message}); rerun the same "
                                           "`ipasdctl tune` command to try it again")
            return
        run = trial.user_attrs.get("run")
        study.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "run": run})
        say(f"trial {trial.number}: {message}; it is re-run in {run}")

    def start() -> None:
        if problem is None:
            start_trials()

    executor.drive(start, settle, running, "running trial", say, study.folder.path)
    if problem is not None:
        raise problem
