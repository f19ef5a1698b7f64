"""One attempt at one run of a comparison or one trial of a study, where it is carried out: a child process of
`compare --jobs N`/`tune --jobs N` (`python -m ipasdctl.studies.job SPEC.json`) or a Ray task of `--ray`
(`run_job(spec)` in a worker).

The spec is plain data (it crosses a process or a machine): `run_dir` (absolute), `resume` (continue from
checkpoints/last.pt, else a new run in run_dir), `recipe` (the resolved recipe as a dict, for a new run),
`threads` (torch intra-op threads, None: leave it), `marker` (a file the coordinator wrote into --out: a
worker that cannot see it is on a machine without the shared file system), `env` (variables set for the
attempt: the coordinator's test hook) and `trial` (a tuning trial, `tune --jobs`/`--ray`: the storage and number
of the trial to report to; studies/trial.py trains it). The result is plain data too: {"status": "finished" |
"error" | "interrupted", "message": ..., "fatal": bool} (a trial's: also "pruned" or "diverged", and its "value");
a crash is whatever the executor sees when no result comes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

import torch

from .. import training
from ..config import recipe_from_dict
from ..errors import UserError
from ..safe_io import atomic_write_json
from .trial import run_trial


def job_spec(run_dir: Path, resume: bool, recipe=None, threads=None, marker=None, env=None, trial=None) -> dict:
    return {"run_dir": str(Path(run_dir).resolve()), "resume": resume,
            "recipe": None if recipe is None else recipe.to_dict(), "threads": threads,
            "marker": None if marker is None else str(marker), "env": dict(env or {}), "trial": trial}


def unseen_marker(spec: dict) -> str | None:
    """The one-line error for a worker that cannot see the coordinator's marker file in --out, else None."""
    marker = spec.get("marker")
    if marker is None or Path(marker).is_file():
        return None
    out = Path(marker).parent
    return (f"machine {socket.gethostname()} cannot see --out {out} (the file {Path(marker).name} the coordinator "
            "wrote there is missing): with --ray, --out must be a folder on a file system every node mounts "
            "at the same path (NFS, a cluster file system)")


@contextlib.contextmanager
def _environment(variables: dict):
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_job(spec: dict) -> dict:
    """Train or resume the run the spec names, quietly; its result (never raises for a user error or a stop)."""
    unseen = unseen_marker(spec)
    if unseen:
        return {"status": "error", "message": unseen, "fatal": True}
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("trial") is not None:  # a tuning trial: it reports to its study and says how it ended
        with _environment(spec.get("env") or {}):
            return run_trial(spec)
    run_dir = Path(spec["run_dir"])
    progress = training.Progress(enabled=False)
    try:
        with _environment(spec.get("env") or {}):
            if spec["resume"]:
                training.resume(run_dir, None, progress)
            else:
                training.train_into(recipe_from_dict(spec["recipe"]), run_dir, progress)
    except UserError as exc:
        return {"status": "error", "message": str(exc), "fatal": False}
    except training.Interrupted as exc:
        return {"status": "interrupted", "message": f"stopped with a checkpoint (status {exc.code})", "code": exc.code,
                "fatal": False}
    return {"status": "finished", "message": "", "fatal": False}


def main(argv: list[str]) -> int:
    """`python -m ipasdctl.studies.job SPEC.json RESULT.json`: run the job, leave its result, exit 0."""
    spec = json.loads(Path(argv[0]).read_text())
    result = run_job(spec)
    atomic_write_json(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
