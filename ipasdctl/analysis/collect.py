"""The runs a report is built from: run folders and comparison folders (their results.csv) read through
runs.RunFolder and runs.ComparisonFolder, deduplicated, with their metrics.csv, and grouped by (data set, arch,
epochs)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from ..runs import RESULT_COLUMNS, ComparisonFolder, RunFolder
from .tables import epochs_text, seed_key


# what a run is: its own folder (summary.json, config.yaml) says so, over a results.csv cell (a hand-edited one
# could hold anything, `=cmd|' /C calc'!A0` included)
IDENTITY_COLUMNS = ("method", "seed", "arch", "dataset", "epochs")


@dataclass
class Run:
    run_dir: Path
    row: dict  # the RESULT_COLUMNS of this run
    source: Path  # the comparison folder it came from, or the run folder itself
    metrics: Optional[object] = None  # metrics.csv as a DataFrame
    eval: Optional[dict] = None


def is_comparison_folder(path: Path) -> bool:
    return ComparisonFolder(path).is_comparison()


def resolve_run_dir(comparison: Path, row: dict) -> Optional[Path]:
    """The run folder of a results.csv row, found inside `comparison` (by the row's run_dir taken relative to
    it, by that folder's name, or by the method and seed): a comparison renamed or moved keeps its runs, and a
    new comparison at its old path never lends it its own. A row whose run_dir points outside the comparison
    is named in a warning (that folder is not used); so is a row without a run folder (None)."""
    value = row.get("run_dir")
    value = value if isinstance(value, str) and value else None
    candidates = []
    if value is not None:
        candidates += [comparison / value] if not Path(value).is_absolute() else []
        candidates.append(comparison / Path(value).name)
    candidates.append(ComparisonFolder(comparison).run(row.get("method"), row.get("seed")).path)
    found = next((c for c in candidates if _inside(c, comparison) and RunFolder(c).config.is_file()), None)
    which = f"{row.get('method')} seed {row.get('seed')}"
    if value is not None and Path(value).is_absolute() and not _inside(Path(value), comparison):
        used = f"using {found} instead" if found is not None else "it is left out of the report"
        print(f"warning: {ComparisonFolder(comparison).results}: the row of {which} points at {value}, outside this "
              f"comparison; {used}", file=sys.stderr)
    elif found is None:
        print(f"warning: {comparison}: no run folder for {which}; it is left out of the report", file=sys.stderr)
    return found


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve()) and path.resolve() != folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False


def collect_runs(dirs: Sequence[Path]) -> tuple[list[Run], list[Path]]:
    """Every run of the given run folders and comparison folders (deduplicated), and the comparison folders."""
    import pandas as pd

    runs: dict[Path, Run] = {}
    comparisons: list[Path] = []
    for directory in map(Path, dirs):
        if is_comparison_folder(directory):
            comparisons.append(directory)
            results = ComparisonFolder(directory).results
            try:
                table = pd.read_csv(results)
            except (ValueError, OSError) as exc:
                raise UserError(f"{results} is not a readable CSV ({exc}); rerun `ipasdctl compare`") from None
            missing = {"method", "seed"} - set(table.columns)
            if missing:
                raise UserError(f"{results} lacks the columns {', '.join(sorted(missing))}; "
                                "it is not a comparison written by `ipasdctl compare`")
            for record in table.to_dict("records"):
                if record.get("status", "finished") != "finished":  # a partial comparison: pending or failed
                    continue
                run_dir = resolve_run_dir(directory, record)
                if run_dir is None:  # resolve_run_dir said why
                    continue
                row = {column: record.get(column) for column in RESULT_COLUMNS}
                own = RunFolder(run_dir).result_row()
                for column in RESULT_COLUMNS:  # what the run is, and what results.csv lacks, from the run itself
                    if (column in IDENTITY_COLUMNS and own[column] is not None) or row[column] is None \
                            or (isinstance(row[column], float) and math.isnan(row[column])):
                        row[column] = own[column]
                row["run_dir"] = str(run_dir)
                runs.setdefault(run_dir.resolve(), Run(run_dir, row, directory))
        elif (folder := RunFolder(directory)).is_run() or folder.config.is_file() and folder.metrics.is_file():
            runs.setdefault(directory.resolve(), Run(directory, folder.result_row(), directory))
        else:
            raise UserError(f"{directory} is neither a run folder (config.yaml, checkpoints/) nor a comparison folder "
                            "(results.csv); pass folders written by `ipasdctl train` or `ipasdctl compare`")
    for run in runs.values():
        metrics_path = RunFolder(run.run_dir).metrics
        if metrics_path.is_file():
            try:
                run.metrics = pd.read_csv(metrics_path)
            except (ValueError, OSError):
                print(f"warning: {metrics_path} is not a readable CSV; no curves for this run", file=sys.stderr)
    return list(runs.values()), comparisons


def group_runs(runs: list[Run]) -> dict[tuple[str, str, str], dict[str, list[Run]]]:
    """(dataset, arch, epochs) -> method label -> runs in seed order. A method whose seeds repeat within a group
    (the same method from two comparisons) is labelled with each run's source folder, so nothing is averaged
    across recipes."""
    groups: dict[tuple[str, str, str], dict[str, list[Run]]] = {}
    ordered = sorted(runs, key=lambda r: (str(r.row.get("dataset")), str(r.row.get("arch")), seed_key(r.row.get("epochs")),
                                          str(r.row.get("method")), seed_key(r.row.get("seed"))))
    for run in ordered:
        key = (str(run.row.get("dataset")), str(run.row.get("arch")), epochs_text(run.row.get("epochs")))
        groups.setdefault(key, {}).setdefault(str(run.row.get("method")), []).append(run)
    for key, by_method in groups.items():
        relabelled: dict[str, list[Run]] = {}
        for method, method_runs in by_method.items():
            seeds = [str(r.row.get("seed")) for r in method_runs]
            if len(seeds) == len(set(seeds)):
                relabelled[method] = method_runs
                continue
            for run in method_runs:
                relabelled.setdefault(f"{method} ({run.source.name})", []).append(run)
        groups[key] = relabelled
    return groups


def is_stale(result: dict, row: dict) -> bool:
    """An eval.json of the best checkpoint from before the run improved (resumed or extended since)."""
    try:
        return result.get("checkpoint") == "best" and int(result["epoch"]) != int(row.get("best_epoch"))
    except (KeyError, TypeError, ValueError):
        return False
