"""Comparisons at tuned parameters: `compare --tuned STUDY...` reads each study's best trial; `compare --tune N`
first tunes every compared method with the same budget of N trials (its study folder inside the comparison
folder), then compares them all at their best trials' parameters, on the test set as always.

A method that distils from a trained run of the reference (tf-kd-self: `reference_run_param`) is not tuned by
`--tune`: its trials would need that run first; it runs at its defaults, which the tables say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

from ..config import ResolvedRecipe, read_yaml, recipe_from_dict
from ..errors import UserError
from ..methods import method_class
from ..runs import ComparisonFolder, StudyFolder
from .. import training
from . import tune as tuning
from .executors import Executor


def read_tuned(studies) -> dict:
    """compare --tuned: method -> (study folder, the recipe overrides of its best trial), from each study
    folder's best.yaml (read through the recipe loader). Two studies of one method are refused."""
    tuned: dict = {}
    for path in studies:
        folder = StudyFolder(Path(path))
        if not folder.is_study():
            raise UserError(f"--tuned {folder.path} is not a study folder (no {folder.record.name}); give a folder "
                            "written by `ipasdctl tune`")
        if not folder.best.is_file():
            raise UserError(f"--tuned {folder.path} has no {folder.best.name}: no trial of it has completed yet; "
                            "run its `ipasdctl tune` command again")
        overrides = read_yaml(folder.best)
        method = (overrides.get("method") or {}).get("name") if isinstance(overrides.get("method"), dict) else None
        if not method:
            raise UserError(f"{folder.best} names no method (method.name); write it again with `ipasdctl tune`")
        if method in tuned:
            raise UserError(f"--tuned names two studies of {method} ({tuned[method][0]}, {folder.path}); give one")
        tuned[method] = (folder.path, overrides)
    return tuned


def tune_each(recipe: ResolvedRecipe, methods: Iterable[str], trials: int, out: Path, progress_enabled: bool = True,
              say: Optional[Callable[[str], None]] = None, executor: Optional[Executor] = None) -> dict:
    """Tune every method (but those with a reference run) for `trials` trials into the comparison folder's
    study folders, the main method with the recipe's parameters as its base, the others with their defaults,
    on `executor` (the comparison's: `compare --tune N --jobs M` tunes on M jobs); returns what read_tuned
    returns for them. Resumable as `tune` is: a rerun adds no trial."""
    tuning.TuneSettings(trials=trials).check()
    tuning.check_recipe(recipe)
    main = recipe.method["name"]
    studies = []
    for method in methods:
        if method_class(method).reference_run_param:
            if say:
                say(f"{method} is not tuned: it distils from a trained reference run; it runs at its defaults")
            continue
        values = recipe.to_dict()
        if method != main:
            values["method"] = {"name": method}
        base = training.resolve_recipe(recipe_from_dict(values))
        folder = ComparisonFolder(out).study(method)
        studies.append(tuning.run(base, tuning.TuneSettings(trials=trials, out=folder), progress_enabled, say,
                                  executor))
    return read_tuned(studies)
