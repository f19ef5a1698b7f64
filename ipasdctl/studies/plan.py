"""The plan of a comparison: every run (method, seed, run folder, resolved recipe) before anything trains.

`plan` checks every run's recipe first, so a mistake in any of them is one line before the first run trains;
`compare.run` carries the plan out. Where each run goes is the comparison folder's business (runs.ComparisonFolder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from .. import training
from ..config import Recipe, ResolvedRecipe, deep_merge, parse_set, recipe_from_dict
from ..errors import UserError, did_you_mean
from ..methods import METHODS, method_class
from ..runs import ComparisonFolder
from ..runs.weights import require_finished, split_run_spec

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
    recipe: ResolvedRecipe  # as the run's config.yaml will record it

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class ComparisonPlan:
    out: Path
    recipe: ResolvedRecipe  # the shared recipe, method = the main method's parameters
    main: str
    methods: list[str]
    seeds: list[int]
    runs: list[PlannedRun]
    tuned: dict = field(default_factory=dict)  # method -> the study folder whose best trial it runs with (compare --tuned)

    @property
    def folder(self) -> ComparisonFolder:
        return ComparisonFolder(self.out)

    def record(self) -> dict:
        """What comparison.yaml holds."""
        recipe = self.recipe.to_dict()
        recipe["train"].pop("seed", None)  # the seeds are listed below
        record = {"recipe": recipe, "main": self.main, "reference": REFERENCE, "methods": list(self.methods),
                  "seeds": list(self.seeds)}
        if self.tuned:
            record["tuned"] = {method: str(study) for method, study in self.tuned.items()}
        return record


def default_out(recipe: Recipe) -> Path:
    return Path("comparisons") / recipe.name


def parse_baseline_set(assignments: Union[Iterable[str], dict, None], methods: list[str]) -> dict[str, dict]:
    """['kd.teacher=RUN', 'kd.alpha=0.5'] -> {"kd": {"teacher": "RUN", "alpha": 0.5}}: a planned method's own
    parameters (values parsed as --set parses them); a method not in the comparison is a UserError."""
    if isinstance(assignments, dict):
        nested = assignments
    else:
        items = list(assignments or [])
        for item in items:
            key = item.split("=", 1)[0]
            if "=" not in item or "." not in key:
                raise UserError(f"--baseline-set expects METHOD.KEY=VALUE (e.g. kd.teacher=RUN_FOLDER), got '{item}'")
        nested = parse_set(items)
    for method, values in nested.items():
        if method not in methods:
            raise UserError(f"--baseline-set {method}.…: '{method}' is not a method of this comparison"
                            f"{did_you_mean(method, methods)}; its methods: {', '.join(methods)}")
        if not isinstance(values, dict):
            raise UserError(f"--baseline-set expects METHOD.KEY=VALUE (e.g. kd.teacher=RUN_FOLDER), got '{method}'")
    return nested


def plan(recipe: Recipe, baselines: Union[str, Iterable[str], None], seeds: Union[str, Iterable[int]],
         out: Optional[Path] = None, tuned: Optional[dict] = None,
         baseline_params: Union[Iterable[str], dict, None] = None) -> ComparisonPlan:
    """Every run of the comparison, seed by seed (ce first, then the main method, then the baselines), with its
    recipe resolved and checked: a mistake in any of them is found before anything trains.

    `tuned`: method -> (study folder, recipe overrides of its best trial): that method runs with them (its
    parameters, optim.lr, ...), every other at its defaults; a tuned method not named is compared too.
    `baseline_params`: a method's own parameters (`--baseline-set kd.teacher=RUN`), over its defaults (or the
    main method's, or its study's)."""
    tuned = dict(tuned or {})
    seeds = parse_seeds(seeds)
    if isinstance(baselines, str):
        baselines = baselines.split(",")
    methods = method_names(recipe.method.get("name"), [*(baselines or []), *tuned])
    own_params = parse_baseline_set(baseline_params, methods)
    shared = training.resolved(recipe)
    main = shared.method["name"]
    out = Path(out) if out is not None else default_out(shared)
    runs = []
    for seed in seeds:  # seed-major: an interrupted comparison already holds complete seeds
        for method in methods:
            values = shared.to_dict()
            values["method"] = values["method"] if method == main else {"name": method}
            if method in tuned:
                values = deep_merge(values, tuned[method][1])
                values["method"]["name"] = method
            values["method"] = {**values["method"], **own_params.get(method, {})}
            reference_key = method_class(method).reference_run_param
            if reference_key and not values["method"].get(reference_key):
                values["method"][reference_key] = reference_run(out, seed)
            elif reference_key:
                _check_given_reference(method, reference_key, str(values["method"][reference_key]), out)
            values["train"]["seed"] = seed
            run_recipe = training.resolve_recipe(recipe_from_dict(values))
            runs.append(PlannedRun(method, seed, ComparisonFolder(out).run(method, seed).path, run_recipe))
    return ComparisonPlan(out, shared, main, methods, seeds, runs, {m: study for m, (study, _) in tuned.items()})


def _check_given_reference(method: str, key: str, spec: str, out: Path) -> None:
    """A run folder given as a method's reference (kd.teacher=RUN) outside the comparison is finished now: found
    before anything trains, not when that method's first run starts. One inside the comparison folder is one
    of its own runs, which the comparison trains first."""
    run = split_run_spec(spec)
    if run is not None and not run[0].resolve().is_relative_to(Path(out).resolve()):
        require_finished(run[0], f"{method}.{key}={spec}")


def reference_run(out: Path, seed: int) -> str:
    """The reference method's run of `seed` in a comparison folder: what a method with a reference_run_param
    distils from."""
    return str(ComparisonFolder(out).run(REFERENCE, seed).path.resolve())
