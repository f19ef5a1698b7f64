"""`ipasdctl compare`: one recipe, several methods, several seeds, one honest table.

The main method (the recipe's, ipasd unless `--method` says otherwise), every baseline named, and always `ce`
(plain cross-entropy, the reference) are trained on the same recipe and data with each seed. A comparison
folder holds:

    comparison.yaml       the shared recipe (method = the main method's, no seed), the methods and the seeds
    <method>-s<seed>/     one ordinary run folder per method and seed (config.yaml, metrics.csv, summary.json, ...)
    results.csv           one row per run
    summary.csv, .md      per method: runs, mean and sample std (n - 1) over seeds of best- and last-epoch top-1,
                          difference of means to ce, rank (by last-epoch top-1); best first

Method parameters given with `--set method.x=...` apply to the main method only; baselines run with their
defaults. `tf-kd-self` distils from the `ce` run of the same seed (trained first), unless the main method is
tf-kd-self and its teacher is given explicitly.

A rerun is cheap: a finished run (summary.json says "finished") is skipped, an interrupted one (it has
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import yaml

from .. import training
from ..config import Recipe, differing_keys, recipe_from_dict
from ..errors import UserError, did_you_mean
from ..files import atomic_write_text
from ..analysis.tables import count_noun
from ..methods import METHODS, method_class
from ..runs import RunFolder, comparison_run_name
from ..yaml_files import read_yaml_file
from .executors import Executor, Sequential
from .scheduler import RunsFailed, carry_out

REFERENCE = "ce"
ALL = "all"


# ------------------------------------------------------------------------------------------------ input


def parse_seeds(text: Union[str, Iterable[int]]) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (duplicates dropped, order kept); anything else is a one-line UserError."""
    if not isinstance(text, str):
        text = ",".join(str(s) for s in text)
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise UserError(f"--seeds expects comma-separated integers such as 0,1,2, got '{text}'")
    seeds: list[int] = []
    for item in items:
        try:
            seed = int(item)
        except ValueError:
            raise UserError(f"--seeds expects comma-separated integers such as 0,1,2; '{item}' is not an "
                            "integer") from None
        if seed < 0:
            raise UserError(f"--seeds must be non-negative integers, got {seed}")
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def method_names(main: str, baselines: Union[str, Iterable[str], None]) -> list[str]:
    """[ce, main, *baselines] without duplicates; `all` means every registered method. Unknown names: UserError."""
    known = METHODS.names()
    if main not in METHODS:
        raise UserError(f"unknown method '{main}'{did_you_mean(main, known)}; known: {', '.join(known)}")
    if baselines is None:
        baselines = []
    if isinstance(baselines, str):
        baselines = baselines.split(",")
    tokens = [token.strip() for token in baselines if token and token.strip()]
    names = [REFERENCE, main]
    for token in tokens:
        if token == ALL:
            names += known
        elif token in METHODS:
            names.append(token)
        else:
            raise UserError(f"--baselines: unknown method '{token}'{did_you_mean(token, [ALL, *known])}; "
                            f"known: {ALL}, {', '.join(known)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class PlannedRun:
    method: str
    seed: int
    run_dir: Path
    recipe: Recipe  # resolved: the method's defaults filled in, as the run's config.yaml will record it

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class ComparisonPlan:
    out: Path
    recipe: Recipe  # the shared recipe, method = the main method's resolved parameters
    main: str
    methods: list[str]
    seeds: list[int]
    runs: list[PlannedRun]

    def record(self) -> dict:
        """What comparison.yaml holds."""
        recipe = self.recipe.to_dict()
        recipe["train"].pop("seed", None)  # the seeds are listed below
        return {"recipe": recipe, "main": self.main, "reference": REFERENCE, "methods": list(self.methods),
                "seeds": list(self.seeds)}


def default_out(recipe: Recipe) -> Path:
    return Path("comparisons") / recipe.name


def plan(recipe: Recipe, baselines: Union[str, Iterable[str], None], seeds: Union[str, Iterable[int]],
         out: Optional[Path] = None) -> ComparisonPlan:
    """Every run of the comparison, seed by seed (ce first, then the main method, then the baselines), with its
    recipe resolved and checked: a mistake in any of them is found before anything trains."""
    seeds = parse_seeds(seeds)
    main = recipe.method.get("name", "ipasd")
    methods = method_names(main, baselines)
    out = Path(out) if out is not None else default_out(recipe)
    shared = copy.deepcopy(recipe)
    training.check_recipe(shared)
    runs = []
    for seed in seeds:  # seed-major: an interrupted comparison already holds complete seeds
        for method in methods:
            run_recipe = copy.deepcopy(recipe)
            run_recipe.method = copy.deepcopy(recipe.method) if method == main else {"name": method}
            reference_key = method_class(method).reference_run_param
            if reference_key and not run_recipe.method.get(reference_key):
                run_recipe.method[reference_key] = reference_run(out, seed)
            run_recipe.train.seed = seed
            training.check_recipe(run_recipe)
            runs.append(PlannedRun(method, seed, out / comparison_run_name(method, seed), run_recipe))
    return ComparisonPlan(out, shared, main, methods, seeds, runs)


def reference_run(out: Path, seed: int) -> str:
    """The reference method's run of `seed` in a comparison folder: what a method with a reference_run_param
    distils from."""
    return str((out / comparison_run_name(REFERENCE, seed)).resolve())


# ------------------------------------------------------------------------------------------------ state of runs


def _without_method_and_seed(recipe: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    recipe.pop("method", None)
    recipe.get("train", {}).pop("seed", None)
    return recipe


def _with_defaults(recipe: dict) -> dict:
    """A recipe recorded by an older version, with the keys added since filled in at their defaults: a new
    key left at its default (data.val_split, say) is no difference. Unreadable as a recipe: as it is."""
    try:
        return recipe_from_dict(recipe).to_dict()
    except UserError:
        return recipe


def _has_trained_runs(out: Path) -> bool:
    return any(child.is_dir() and RunFolder(child).state() != "new" for child in out.iterdir())


def prepare(comparison: ComparisonPlan) -> None:
    """Refuse a folder that holds runs of another recipe; then record the comparison in comparison.yaml."""
    out = comparison.out
    record_path = out / "comparison.yaml"
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
        say: Optional[Callable[[str], None]] = say_on_stderr, executor: Optional[Executor] = None,
        tables: Optional[Callable[[ComparisonPlan, dict], None]] = None) -> list[dict]:
    """Prepare the folder, then train, resume or skip every planned run through `executor` (default: one after
    another in this process, with `progress`); `tables(comparison, failed)` is called whenever a run ends
    (studies.summary.write_tables: a partial table, then the whole one). The comparison folder is locked
    meanwhile: a second `compare` on it is refused. Returns the summaries in plan order; RunsFailed when runs
    failed after their retry (the others are in the tables)."""
    say = say or (lambda message: None)
    prepare(comparison)
    executor = executor or Sequential(progress)
    lock = RunFolder(comparison.out).lock()
    lock.acquire()
    try:
        executor.open(comparison.out)
        try:
            after_each = (lambda failed: tables(comparison, failed)) if tables is not None else None
            failed = carry_out(comparison.runs, executor, say, prerequisites(comparison), after_each)
        finally:
            executor.close()
    finally:
        lock.release()
    if failed:
        names = ", ".join(failed)
        raise RunsFailed(f"{count_noun(len(failed), 'run')} of {len(comparison.runs)} failed ({names}; reasons above); "
                         "the tables mark them failed; rerun the same command to train them again")
    return [RunFolder(planned.run_dir).read_summary() for planned in comparison.runs]
