"""The tables of a comparison: results.csv (one row per run), summary.csv and summary.md (per method: mean and
sample std over seeds, difference of means to ce, rank)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..analysis.tables import count_noun
from ..errors import UserError
from ..files import atomic_write_text
from ..methods import method_class
from ..runs import RESULT_COLUMNS, RunFolder
from .compare import REFERENCE, ComparisonPlan, reference_run

INTEGER_COLUMNS = ["seed", "epochs", "best_epoch", "params", "macs"]
SUMMARY_COLUMNS = ["method", "runs", "best_top1_mean", "best_top1_std", "last_top1_mean", "last_top1_std",
                   "delta_best_top1", "delta_last_top1", "train_seconds_mean", "rank"]


def results_table(comparison: ComparisonPlan, failed: Optional[dict] = None):
    """One row per planned run, from its summary.json; `status` says finished, failed (named in `failed`) or
    pending (not trained yet: its numbers are empty). A table with a run not finished is partial."""
    import pandas as pd

    failed = failed or {}
    rows = []
    for planned in comparison.runs:
        summary = RunFolder(planned.run_dir).read_summary()
        finished = summary is not None and summary.get("finished") is True
        row = {column: summary.get(column) for column in RESULT_COLUMNS} if finished else {}
        row.update(method=planned.method, seed=planned.seed, run_dir=str(planned.run_dir),
                   status="finished" if finished else "failed" if planned.name in failed else "pending")
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "status"])
    # whole numbers stay whole when a pending row leaves them empty (not 3.12589e+06 for MACs)
    return table.astype({column: "Int64" for column in INTEGER_COLUMNS})


def summary_table(results, reference: str = REFERENCE, partial: bool = False):
    """Per method: runs, mean and sample std (n - 1; empty for one run) of best- and last-epoch top-1, the
    difference of means to `reference`, rank 1 = highest last-epoch mean (ties share a rank); sorted by rank,
    then by best-epoch mean. A partial table (`partial`) may lack the reference: its differences are empty."""
    import pandas as pd

    grouped = results.groupby("method", sort=False)
    table = pd.DataFrame({
        "runs": grouped.size(),
        "best_top1_mean": grouped["best_top1"].mean(),
        "best_top1_std": grouped["best_top1"].std(ddof=1),
        "last_top1_mean": grouped["last_top1"].mean(),
        "last_top1_std": grouped["last_top1"].std(ddof=1),
    })
    if reference not in table.index and not partial:
        raise UserError(f"the comparison has no '{reference}' runs to compare with")
    has_reference = reference in table.index
    for column in ["best_top1", "last_top1"]:
        base = table.loc[reference, f"{column}_mean"] if has_reference else float("nan")
        table[f"delta_{column}"] = table[f"{column}_mean"] - base
    table["train_seconds_mean"] = grouped["train_seconds"].mean()
    table["rank"] = table["last_top1_mean"].rank(ascending=False, method="min").astype(int)
    table = table.rename_axis("method").reset_index()
    table = table.sort_values(["rank", "best_top1_mean"], ascending=[True, False], kind="stable")
    return table[SUMMARY_COLUMNS].reset_index(drop=True)


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _delta(value: float) -> str:
    return "" if math.isnan(value) else f"{value:+.2f}"


def _method_parameters(comparison: ComparisonPlan) -> list[str]:
    lines, seen = [], set()
    for planned in comparison.runs:
        if planned.method in seen:
            continue
        seen.add(planned.method)
        params = {k: v for k, v in planned.recipe.method.items() if k != "name"}
        reference_key = method_class(planned.method).reference_run_param
        if reference_key and params.get(reference_key) == reference_run(comparison.out, planned.seed):
            params[reference_key] = f"{REFERENCE} run of the same seed"
        text = ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"
        lines.append(f"- `{planned.method}`: {text}")
    return lines


def _partial_notice(results, failed: dict) -> list[str]:
    """The lines that mark a partial table: how many runs finished, which are pending, which failed and why."""
    unfinished = results[results["status"] != "finished"]
    if unfinished.empty:
        return []
    names = {status: [Path(d).name for d in unfinished.loc[unfinished["status"] == status, "run_dir"]]
             for status in ("pending", "failed")}
    lines = [f"**Partial table**: {len(results) - len(unfinished)} of {len(results)} runs finished."]
    if names["pending"]:
        lines.append(f"Pending (training, or not started): {', '.join(names['pending'])}.")
    for name in names["failed"]:
        lines.append(f"Failed: {name}: {failed.get(name, 'see the comparison output')}.")
    return [" ".join(lines), ""]


def summary_markdown(comparison: ComparisonPlan, summary, results=None, failed: Optional[dict] = None) -> str:
    recipe = comparison.recipe
    seeds = ", ".join(str(s) for s in comparison.seeds)
    header = ["rank", "method", "runs", "last-epoch top-1 (%)", f"Δ last vs {REFERENCE}", "best-epoch top-1 (%)",
              f"Δ best vs {REFERENCE}", "train s / run"]
    lines = [
        f"# Comparison: {recipe.name}",
        "",
        *(_partial_notice(results, failed or {}) if results is not None else []),
        f"{recipe.data.name}, {recipe.model.arch}, {count_noun(recipe.train.epochs, 'epoch')}, batch {recipe.train.batch_size}, "
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
            "(reference)" if reference else _delta(row.delta_last_top1),
            _mean_std(row.best_top1_mean, row.best_top1_std),
            "(reference)" if reference else _delta(row.delta_best_top1),
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


def write_tables(comparison: ComparisonPlan, failed: Optional[dict] = None):
    """Write results.csv, summary.csv and summary.md into the comparison folder, each atomically (readable at any
    moment); runs not finished make them partial (results.csv: their status; summary.md: a notice). `failed`:
    the runs that failed, with why. Returns (results, summary)."""
    results = results_table(comparison, failed)
    finished = results[results["status"] == "finished"].infer_objects()  # numbers, not the pending rows' None
    partial = len(finished) < len(results)
    summary = summary_table(finished, partial=partial)
    out = comparison.out
    atomic_write_text(out / "results.csv", results.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "summary.md", summary_markdown(comparison, summary, results, failed))
    return results, summary
