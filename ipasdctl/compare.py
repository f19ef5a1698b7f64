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
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import yaml

from . import engine
from .config import Recipe
from .errors import UserError, did_you_mean
from .io import atomic_write_text
from .registry import METHODS, load_all

REFERENCE = "ce"
ALL = "all"
# methods that distil from a trained network of the same architecture: the parameter that names its run folder
TEACHER_FROM_REFERENCE = {"tf-kd-self": "teacher"}

RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "best_top1", "last_top1", "best_epoch", "best_top5",
                  "params", "macs", "train_seconds", "images_per_second", "run_dir"]
SUMMARY_COLUMNS = ["method", "runs", "best_top1_mean", "best_top1_std", "last_top1_mean", "last_top1_std",
                   "delta_best_top1", "delta_last_top1", "train_seconds_mean", "rank"]


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
    load_all()
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


def run_dir_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


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
    engine.check_recipe(shared)
    runs = []
    for seed in seeds:  # seed-major: an interrupted comparison already holds complete seeds
        for method in methods:
            run_recipe = copy.deepcopy(recipe)
            run_recipe.method = copy.deepcopy(recipe.method) if method == main else {"name": method}
            teacher_key = TEACHER_FROM_REFERENCE.get(method)
            if teacher_key and not run_recipe.method.get(teacher_key):
                run_recipe.method[teacher_key] = str((out / run_dir_name(REFERENCE, seed)).resolve())
            run_recipe.train.seed = seed
            engine.check_recipe(run_recipe)
            runs.append(PlannedRun(method, seed, out / run_dir_name(method, seed), run_recipe))
    return ComparisonPlan(out, shared, main, methods, seeds, runs)


# ------------------------------------------------------------------------------------------------ state of runs


def run_state(run_dir: Path) -> str:
    """'finished' (summary.json says so), 'resumable' (checkpoints/last.pt exists) or 'new'."""
    summary = read_summary(run_dir)
    if summary is not None and summary.get("finished") is True:
        return "finished"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "resumable"
    return "new"


def read_summary(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _differing_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for key in list(dict.fromkeys([*a, *b])):
            keys += _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]


def _without_method_and_seed(recipe: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    recipe.pop("method", None)
    recipe.get("train", {}).pop("seed", None)
    return recipe


def _has_trained_runs(out: Path) -> bool:
    return any(child.is_dir() and run_state(child) != "new" for child in out.iterdir())


def prepare(comparison: ComparisonPlan) -> None:
    """Refuse a folder that holds runs of another recipe; then record the comparison in comparison.yaml."""
    out = comparison.out
    record_path = out / "comparison.yaml"
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder for the comparison")
    if record_path.is_file() and _has_trained_runs(out):
        try:
            previous = yaml.safe_load(record_path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            raise UserError(f"{record_path} is unreadable; remove it or choose another --out") from None
        diff = _differing_keys(_without_method_and_seed(previous.get("recipe") or {}),
                               _without_method_and_seed(comparison.record()["recipe"]))
        if diff:
            raise UserError(f"{out} holds a comparison with another recipe (differs in {', '.join(diff)}); "
                            "rerun with the same recipe options or choose another --out")
    for run in comparison.runs:
        config_path = run.run_dir / "config.yaml"
        if run_state(run.run_dir) == "new" or not config_path.is_file():
            continue
        try:
            saved = yaml.safe_load(config_path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            raise UserError(f"{config_path} is unreadable; remove the run folder {run.run_dir} to train it "
                            "again") from None
        diff = _differing_keys(saved, run.recipe.to_dict())
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


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    return max(len(path.read_text().strip().splitlines()) - 1, 0)


def _remove_partial(run_dir: Path) -> None:
    """A folder without a checkpoint holds nothing worth keeping, unless another process is writing it."""
    lock = engine.RunLock(run_dir)
    lock.acquire()  # a UserError when a live process holds the run
    lock.release()
    shutil.rmtree(run_dir)


def run(comparison: ComparisonPlan, progress: Optional[engine.Progress] = None,
        say: Optional[Callable[[str], None]] = say_on_stderr) -> list[dict]:
    """Prepare the folder, then train, resume or skip every planned run in order; their summaries in order."""
    say = say or (lambda message: None)
    prepare(comparison)
    summaries = []
    total = len(comparison.runs)
    for number, planned in enumerate(comparison.runs, 1):
        run_dir, epochs = planned.run_dir, planned.recipe.train.epochs
        head = f"[{number}/{total}] {planned.name}:"
        state = run_state(run_dir)
        if state == "finished":
            summary = read_summary(run_dir)
            say(f"{head} finished, skipped (best-epoch top-1 {summary.get('best_top1', float('nan')):.2f}%, "
                f"last-epoch {summary.get('last_top1', float('nan')):.2f}%)")
        elif state == "resumable":
            say(f"{head} resuming after epoch {_epochs_done(run_dir)}/{epochs}")
            engine.resume(run_dir, None, progress)
        else:
            if run_dir.exists():
                _remove_partial(run_dir)
            say(f"{head} training {planned.method}, seed {planned.seed}, {_count(epochs, 'epoch')}")
            engine.train_into(copy.deepcopy(planned.recipe), run_dir, progress)
        summary = read_summary(run_dir)
        if summary is None or summary.get("finished") is not True:
            raise UserError(f"{run_dir} did not finish (no finished summary.json); rerun the comparison")
        summaries.append(summary)
    return summaries


# ------------------------------------------------------------------------------------------------ tables


def results_table(comparison: ComparisonPlan):
    """One row per planned run, from its summary.json."""
    import pandas as pd

    rows = []
    for planned in comparison.runs:
        summary = read_summary(planned.run_dir)
        if summary is None or summary.get("finished") is not True:
            raise UserError(f"{planned.run_dir} has no finished summary.json; rerun the comparison to train it")
        row = {column: summary.get(column) for column in RESULT_COLUMNS}
        row.update(method=planned.method, seed=planned.seed, run_dir=str(planned.run_dir))
        rows.append(row)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def summary_table(results, reference: str = REFERENCE):
    """Per method: runs, mean and sample std (n - 1; empty for one run) of best- and last-epoch top-1, the
    difference of means to `reference`, rank 1 = highest last-epoch mean (ties share a rank); sorted by rank,
    then by best-epoch mean."""
    import pandas as pd

    grouped = results.groupby("method", sort=False)
    table = pd.DataFrame({
        "runs": grouped.size(),
        "best_top1_mean": grouped["best_top1"].mean(),
        "best_top1_std": grouped["best_top1"].std(ddof=1),
        "last_top1_mean": grouped["last_top1"].mean(),
        "last_top1_std": grouped["last_top1"].std(ddof=1),
    })
    if reference not in table.index:
        raise UserError(f"the comparison has no '{reference}' runs to compare with")
    table["delta_best_top1"] = table["best_top1_mean"] - table.loc[reference, "best_top1_mean"]
    table["delta_last_top1"] = table["last_top1_mean"] - table.loc[reference, "last_top1_mean"]
    table["train_seconds_mean"] = grouped["train_seconds"].mean()
    table["rank"] = table["last_top1_mean"].rank(ascending=False, method="min").astype(int)
    table = table.rename_axis("method").reset_index()
    table = table.sort_values(["rank", "best_top1_mean"], ascending=[True, False], kind="stable")
    return table[SUMMARY_COLUMNS].reset_index(drop=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _method_parameters(comparison: ComparisonPlan) -> list[str]:
    lines, seen = [], set()
    for planned in comparison.runs:
        if planned.method in seen:
            continue
        seen.add(planned.method)
        params = {k: v for k, v in planned.recipe.method.items() if k != "name"}
        teacher_key = TEACHER_FROM_REFERENCE.get(planned.method)
        if teacher_key and params.get(teacher_key) == str((comparison.out / run_dir_name(REFERENCE, planned.seed))
                                                           .resolve()):
            params[teacher_key] = f"{REFERENCE} run of the same seed"
        text = ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"
        lines.append(f"- `{planned.method}`: {text}")
    return lines


def summary_markdown(comparison: ComparisonPlan, summary) -> str:
    recipe = comparison.recipe
    seeds = ", ".join(str(s) for s in comparison.seeds)
    header = ["rank", "method", "runs", "last-epoch top-1 (%)", f"Δ last vs {REFERENCE}", "best-epoch top-1 (%)",
              f"Δ best vs {REFERENCE}", "train s / run"]
    lines = [
        f"# Comparison: {recipe.name}",
        "",
        f"{recipe.data.name}, {recipe.model.arch}, {_count(recipe.train.epochs, 'epoch')}, batch {recipe.train.batch_size}, "
        f"lr {recipe.optim.lr:g}; seeds {seeds}. Test top-1 accuracy, mean ± sample standard deviation over the "
        "seeds; ranked by last-epoch top-1.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:", ":---", "---:", "---:", "---:", "---:", "---:", "---:"]) + "|",
    ]
    for row in summary.itertuples(index=False):
        reference = row.method == REFERENCE
        cells = [
            str(row.rank), f"`{row.method}`", str(row.runs),
            _mean_std(row.last_top1_mean, row.last_top1_std),
            "(reference)" if reference else f"{row.delta_last_top1:+.2f}",
            _mean_std(row.best_top1_mean, row.best_top1_std),
            "(reference)" if reference else f"{row.delta_best_top1:+.2f}",
            f"{row.train_seconds_mean:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "- **Last-epoch top-1** is the test accuracy of the model the run ends with: the honest number, the model "
        "you would ship.",
        "- **Best-epoch top-1** is the highest test accuracy over all epochs. Choosing the epoch on the test set "
        "makes it optimistic; it is what most papers report.",
        f"- Δ is the difference of means to `{REFERENCE}` (plain cross-entropy), in percentage points. A "
        "difference smaller than the standard deviations is within seed-to-seed noise.",
        "- Method parameters (`--set method.x=...` applies to the main method only; the others use their "
        "defaults):",
        *[f"  {line}" for line in _method_parameters(comparison)],
        "- Per-run numbers: `results.csv`; run folders: `<method>-s<seed>/`; the recipe: `comparison.yaml`.",
        "",
    ]
    return "\n".join(lines)


def tables(comparison: ComparisonPlan):
    """Write results.csv, summary.csv and summary.md into the comparison folder; return (results, summary)."""
    results = results_table(comparison)
    summary = summary_table(results)
    out = comparison.out
    atomic_write_text(out / "results.csv", results.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "summary.md", summary_markdown(comparison, summary))
    return results, summary
