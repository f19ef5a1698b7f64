"""`ipasdctl compare`: one recipe, several methods, several seeds, one honest table.

The main method (the recipe's, ipasd unless `--method` says otherwise), every baseline named, and always `ce`
(plain cross-entropy, the reference) are trained on the same recipe and data with each seed (the plan:
studies/plan.py). The comparison folder (its layout: runs/comparison.py) holds the comparison's record, one
ordinary run folder per method and seed, and the tables (studies/summary.py): one row per run, and per method
the mean and spread over seeds, the difference to ce and the rank.

Method parameters given with `--set method.x=...` apply to the main method only; baselines run with their
defaults, unless a tuning study gives a method its best trial's parameters (`--tuned`, `--tune N`:
studies/tuned.py; the plan carries them). `tf-kd-self` distils from the `ce` run of the same seed (trained first), unless the main method is
tf-kd-self and its teacher is given explicitly.

A rerun is cheap: a finished run (its summary says "finished") is skipped, an interrupted one (it has
checkpoints/last.pt) is resumed, a leftover folder without a checkpoint is removed and trained again. A rerun
may name other methods or seeds (runs are added or reused; the tables describe the latest command), but a
folder that already holds runs of another recipe is refused.

The runs go through an executor (studies/executors.py: one after another in this process, processes on this
machine, Ray tasks) driven by studies/scheduler.py (waits for reference runs, retries, progress); the tables
are rewritten by this process as runs end, partial until every run has finished.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable, Optional

import yaml

from .. import training
from ..config import differing_keys
from ..errors import UserError
from ..analysis.tables import count_noun
from ..methods import method_class
from ..runs import RunFolder, RunSummary
from ..safe_io import atomic_write_text
from ..yaml_files import read_yaml_file
from .executors import Executor, Sequential
from .plan import ComparisonPlan
from .scheduler import RunsFailed, carry_out
from .summary import write_tables

# ------------------------------------------------------------------------------------------------ state of runs


def _without_method_and_seed(recipe: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    recipe.pop("method", None)
    recipe.get("train", {}).pop("seed", None)
    return recipe


def _with_defaults(recipe: dict) -> dict:
    """A recipe recorded by an older version, with the keys added since filled in at their defaults: a new
    key left at its default (data.val_split, say) is no difference. Unreadable as a recipe: as it is."""
    return training.resolved_dict(recipe)


def _has_trained_runs(out: Path) -> bool:
    return any(child.is_dir() and RunFolder(child).state() != "new" for child in out.iterdir())


def prepare(comparison: ComparisonPlan) -> None:
    """Refuse a folder that holds runs of another recipe; then record the comparison in the folder."""
    out = comparison.out
    record_path = comparison.folder.record
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder for the comparison")
    if record_path.is_file() and _has_trained_runs(out):
        previous = read_yaml_file(record_path, str(record_path), "remove it or choose another --out") or {}
        if not isinstance(previous, dict):
            raise UserError(f"{record_path} is not a comparison record (a mapping); remove it or choose another --out")
        diff = differing_keys(_without_method_and_seed(_with_defaults(previous.get("recipe") or {})),
                               _without_method_and_seed(comparison.record()["recipe"]))
        if diff:
            raise UserError(f"{out} holds a comparison with another recipe (differs in {', '.join(diff)}); "
                            "rerun with the same recipe options or choose another --out")
    for run in comparison.runs:
        folder = RunFolder(run.run_dir)
        if folder.state() == "new" or not folder.config.is_file():
            continue
        diff = differing_keys(_with_defaults(folder.read_config()), run.recipe.to_dict())
        if diff:
            raise UserError(f"{run.run_dir} was trained with another recipe (differs in {', '.join(diff)}); "
                            "rerun with the same options, remove that run folder, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create comparison folder {out}: {exc.strerror}; choose a writable --out") from None
    atomic_write_text(record_path, yaml.safe_dump(comparison.record(), sort_keys=False))


# ------------------------------------------------------------------------------------------------ run


def say_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prerequisites(comparison: ComparisonPlan) -> dict[str, str]:
    """Run name -> the name of the planned run it needs first: a method's reference_run_param that names a run
    folder of this comparison (tf-kd-self's teacher: the ce run of its seed)."""
    names = {planned.run_dir.resolve(): planned.name for planned in comparison.runs}
    needs = {}
    for planned in comparison.runs:
        key = method_class(planned.method).reference_run_param
        value = planned.recipe.method.get(key) if key else None
        if value and Path(value).resolve() in names:
            needs[planned.name] = names[Path(value).resolve()]
    return needs


def run(comparison: ComparisonPlan, progress: Optional[training.Progress] = None,
        say: Optional[Callable[[str], None]] = say_on_stderr,
        executor: Optional[Executor] = None) -> list[Optional[RunSummary]]:
    """Prepare the folder, then train, resume or skip every planned run through `executor` (default: one after
    another in this process, with `progress`), and rewrite the tables whenever a run ends (write_tables: a
    partial table, then the whole one). The comparison folder is locked meanwhile: a second `compare` on it is
    refused. Returns the summaries in plan order; RunsFailed when runs failed after their retry (the others are
    in the tables)."""
    say = say or (lambda message: None)
    prepare(comparison)
    executor = executor or Sequential(progress)
    lock = comparison.folder.lock()
    lock.acquire()
    try:
        executor.open(comparison.out)
        try:
            failed = carry_out(comparison.runs, executor, say, prerequisites(comparison),
                               lambda failed: write_tables(comparison, failed))
        finally:
            executor.close()
    finally:
        lock.release()
    if failed:
        names = ", ".join(failed)
        raise RunsFailed(f"{count_noun(len(failed), 'run')} of {len(comparison.runs)} failed ({names}; reasons above); "
                         "the tables mark them failed; rerun the same command to train them again")
    return [RunFolder(planned.run_dir).read_summary() for planned in comparison.runs]
