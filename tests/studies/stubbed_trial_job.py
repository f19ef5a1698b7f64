"""A job process of `tune --jobs` whose trials train nothing (`python -m tests.studies.stubbed_trial_job SPEC
RESULT`, the module of test_tune_jobs.py's executor): each reports three epochs of a validation top-1 its run
folder's name decides, to the study's storage, through the real job and trial code.

- runs trial-0002 and later: 1 % (hopeless, once a trial has completed at 90 %); the others 90 %;
- run trial-0000: its first process SIGKILLs itself (a crash), leaving a mark so that its re-run goes on.
"""

from __future__ import annotations

import os
import signal
import sys

from ipasdctl.studies import job, trial

CRASHES = "trial-0000"
FIRST_HOPELESS = "trial-0002"
CRASH_MARK = "crashed-once"


def stubbed(recipe, folder, progress) -> float:
    folder.path.mkdir(parents=True, exist_ok=True)
    if folder.name == CRASHES and not (folder.path / CRASH_MARK).exists():
        (folder.path / CRASH_MARK).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    value = 1.0 if folder.name >= FIRST_HOPELESS else 90.0
    for epoch in (1, 2, 3):
        progress.epoch_finished({"epoch": epoch, "val_top1": value})
    return value


trial.train_trial = stubbed

if __name__ == "__main__":
    sys.exit(job.main(sys.argv[1:]))
