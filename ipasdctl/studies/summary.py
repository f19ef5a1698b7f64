"""The tables of a comparison: results.csv (one row per run), summary.csv and summary.md (per method: mean,
sample std and 95 % t-interval over seeds (clipped to 0-100 %, left out below 3 seeds), difference of means to
ce, the paired difference to ce over shared seeds with its interval, p-value and verdict, rank; the statistics
are in analysis/statistics.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..analysis.statistics import ACCURACY_CI_NOTE, MIN_SEEDS, accuracy_interval, paired_test
from ..analysis.tables import count_noun
from ..errors import UserError
from ..methods import method_class
from ..runs import RESULT_COLUMNS, RunFolder, comparison_run_name
from ..safe_io import atomic_write_text, csv_text
from .plan import REFERENCE, ComparisonPlan, reference_run

INTEGER_COLUMNS = ["seed", "epochs", "best_epoch", "params", "macs"]
STAT_COLUMNS = ("best_top1", "last_top1")
CHANGES_IMAGES_MARK = "†"  # after the name of a method that trains on images it changes
SUMMARY_COLUMNS = ["method", "changes_images", "runs",
                   *[f"{c}_{s}" for c in STAT_COLUMNS for s in ("mean", "std", "ci_low", "ci_high")],
                   "delta_best_top1", "delta_last_top1", "paired_seeds",
                   *[f"paired_delta_{c}_{s}" for c in STAT_COLUMNS for s in ("mean", "ci_low", "ci_high", "p")],
                   "verdict_best_top1", "verdict_last_top1", "best_chosen_on", "train_seconds_mean", "rank"]


def results_table(comparison: ComparisonPlan, failed: Optional[dict] = None):
    """One row per planned run, from its summary.json; `status` says finished, failed (named in `failed`) or
    pending (not trained yet: its numbers are empty). A table with a run not finished is partial."""
    import pandas as pd

    failed = failed or {}
    rows = []
    for planned in comparison.runs:
        summary = RunFolder(planned.run_dir).read_summary()
        finished = summary is not None and summary.finished
        row = summary.result_row() if finished else {}
        # the method's declaration, also for a pending run or one trained before summaries recorded it
        row.update(method=planned.method, changes_images=method_class(planned.method).changes_images,
                   seed=planned.seed, run_dir=str(planned.run_dir),
                   status="finished" if finished else "failed" if planned.name in failed else "pending")
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "status"])
    # whole numbers stay whole when a pending row leaves them empty (not 3.12589e+06 for MACs)
    return table.astype({column: "Int64" for column in INTEGER_COLUMNS})


def summary_table(results, reference: str = REFERENCE, best_chosen_on: str = "test", partial: bool = False):
    """Per method: runs, mean, sample std (n - 1; empty for one run) and 95 % t-interval of best- and
    last-epoch top-1 (statistics.accuracy_interval: clipped to 0-100 %, empty below 3 runs), the difference of
    means to `reference`, the paired difference to it over the seeds both have (mean, 95 % interval, paired
    t-test p-value, verdict; analysis/statistics.py), which split chose the best epoch, rank 1 = highest last-epoch mean (ties share a rank); sorted by rank, then by best-epoch mean.
    A partial table (`partial`: some runs not finished) may lack the reference: its differences are empty."""
    import pandas as pd

    grouped = results.groupby("method", sort=False)
    if reference not in grouped.groups and not partial:
        raise UserError(f"the comparison has no '{reference}' runs to compare with")
    if results.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    reference_runs = results[results["method"] == reference]
    rows = []
    for method, runs in grouped:
        row = {"method": method, "changes_images": _changes_images(runs), "runs": len(runs)}
        pairs = _paired(runs, reference_runs)
        row["paired_seeds"] = len(pairs)
        for column in STAT_COLUMNS:
            mean, std, low, high = accuracy_interval(runs[column].tolist())  # clipped; none below 3 seeds
            row.update({f"{column}_mean": mean, f"{column}_std": std, f"{column}_ci_low": low, f"{column}_ci_high": high})
            test = paired_test(pairs[f"{column}_x"].tolist(), pairs[f"{column}_ref"].tolist())
            row.update({f"paired_delta_{column}_mean": test["mean"], f"paired_delta_{column}_ci_low": test["low"],
                        f"paired_delta_{column}_ci_high": test["high"], f"paired_delta_{column}_p": test["p"],
                        f"verdict_{column}": "(reference)" if method == reference else test["verdict"]})
        row["train_seconds_mean"] = runs["train_seconds"].mean()
        rows.append(row)
    table = pd.DataFrame(rows).set_index("method")
    for column in STAT_COLUMNS:
        base = table.loc[reference, f"{column}_mean"] if reference in table.index else float("nan")
        table[f"delta_{column}"] = table[f"{column}_mean"] - base
    table["best_chosen_on"] = best_chosen_on
    table["rank"] = table["last_top1_mean"].rank(ascending=False, method="min").astype(int)
    table = table.rename_axis("method").reset_index()
    table = table.sort_values(["rank", "best_top1_mean"], ascending=[True, False], kind="stable")
    return table[SUMMARY_COLUMNS].reset_index(drop=True)


def _changes_images(runs) -> bool:
    """Whether a method's runs trained on images it changed (results.csv's column; absent: no)."""
    if "changes_images" not in runs.columns:
        return False
    return bool(runs["changes_images"].map(lambda value: value is True or str(value) == "True").any())


def _paired(runs, reference_runs):
    """The seeds both have: <column>_x (the method's) and <column>_ref (the reference's), by seed."""
    import pandas as pd

    if "seed" not in runs.columns:  # hand-made tables without seeds: nothing to pair
        return pd.DataFrame({f"{c}_{side}": [] for c in STAT_COLUMNS for side in ("x", "ref")})
    columns = ["seed", *STAT_COLUMNS]
    return runs[columns].merge(reference_runs[columns], on="seed", suffixes=("_x", "_ref")).sort_values("seed")


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _interval(low: float, high: float, signed: bool = False) -> str:
    if math.isnan(low) or math.isnan(high):
        return "—"
    spec = "+.2f" if signed else ".2f"
    return f"[{low:{spec}}, {high:{spec}}]"


def _paired_cell(row, column: str) -> str:
    mean = getattr(row, f"paired_delta_{column}_mean")
    if math.isnan(mean):
        return "no shared seeds"
    return f"{mean:+.2f} {_interval(getattr(row, f'paired_delta_{column}_ci_low'), getattr(row, f'paired_delta_{column}_ci_high'), True)}"


def _p_cell(p: float) -> str:
    return "—" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


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
        if comparison.tuned:  # where each method's parameters came from
            study = comparison.tuned.get(planned.method)
            text += (f"; optim.lr={planned.recipe.optim.lr:g}, optim.weight_decay={planned.recipe.optim.weight_decay:g}"
                     f" (tuned: best trial of study {study})" if study else " (defaults: no study)")
        lines.append(f"- `{planned.method}`: {text}")
    return lines


def _teachers(comparison: ComparisonPlan) -> dict[str, str]:
    """Method -> what its teacher costs (from its finished runs' summary.json), for the methods that used one."""
    notes: dict[str, str] = {}
    for planned in comparison.runs:
        summary = RunFolder(planned.run_dir).read_summary()
        if planned.method in notes or summary is None or not summary.teacher_params:
            continue
        macs = f", {summary.teacher_macs / 1e6:.1f}M MACs per image" if summary.teacher_macs else ""
        student = f" beside the student's {summary.macs / 1e6:.1f}M" if summary.macs and macs else ""
        notes[planned.method] = (f"`{planned.method}`: teacher {summary.teacher_arch} ({summary.teacher_params / 1e6:.2f}M "
                                 f"parameters{macs}{student}; `{summary.teacher}`)")
    return notes


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
    val_split = recipe.data.val_split
    header = ["rank", "method", "runs", "last-epoch top-1 (%)", "95 % CI", f"Δ last vs {REFERENCE}, paired [95 % CI]",
              "p", "verdict", "best-epoch top-1 (%)", f"Δ best vs {REFERENCE}, paired", "verdict (best)", "train s / run"]
    noise = recipe.data.label_noise
    setting = (f"{recipe.data.name}, {recipe.model.arch}, {count_noun(recipe.train.epochs, 'epoch')}, batch "
               f"{recipe.train.batch_size}, lr {recipe.optim.lr:g}"
               + (f", {recipe.data.train_subset} training images" if recipe.data.train_subset else "")
               + (f", {100 * noise.rate:g} % {noise.kind} label noise" if noise.rate > 0 else "")
               + (f", {val_split} validation images" if val_split else ""))
    lines = [
        f"# Comparison: {recipe.name}",
        "",
        *(_partial_notice(results, failed or {}) if results is not None else []),
        f"{setting}; seeds {seeds}. Test top-1 accuracy, mean ± sample standard deviation over the seeds; ranked by "
        "last-epoch top-1.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:", ":---", "---:", "---:", "---:", "---:", "---:", ":---", "---:", "---:", ":---", "---:"]) + "|",
    ]
    teachers = _teachers(comparison)
    for row in summary.itertuples(index=False):
        reference = row.method == REFERENCE
        cells = [
            str(row.rank), f"`{row.method}`{CHANGES_IMAGES_MARK if row.changes_images else ''}"
            + (" (teacher)" if row.method in teachers else ""), str(row.runs),
            _mean_std(row.last_top1_mean, row.last_top1_std),
            _interval(row.last_top1_ci_low, row.last_top1_ci_high),
            "(reference)" if reference else _paired_cell(row, "last_top1"),
            "" if reference else _p_cell(row.paired_delta_last_top1_p),
            "" if reference else row.verdict_last_top1,
            _mean_std(row.best_top1_mean, row.best_top1_std),
            "(reference)" if reference else _paired_cell(row, "best_top1"),
            "" if reference else row.verdict_best_top1,
            f"{row.train_seconds_mean:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if val_split:
        best_note = (f"- **Best-epoch top-1** is the test accuracy at the epoch with the best top-1 on the validation "
                     f"split ({val_split} training images held out, `data.val_split`): the test set chose nothing, so "
                     "it is an honest number too.")
    else:
        best_note = ("- **Best-epoch top-1** is the highest test accuracy over all epochs. Choosing the epoch on the "
                     "test set makes it optimistic; it is what most papers report (`--set data.val_split=N` chooses "
                     "it on held-out training images instead).")
    pairs = int(summary["paired_seeds"].min()) if len(summary) else 0
    marked = [f"`{method}`" for method in summary.loc[summary["changes_images"].astype(bool), "method"]]
    lines += [
        "",
        "- **Last-epoch top-1** is the test accuracy of the model the run ends with: the honest number, the model "
        "you would ship.",
        best_note,
        f"- 95 % CI: {ACCURACY_CI_NOTE}. Δ is the mean of the paired differences to `{REFERENCE}` "
        "(plain cross-entropy) over the seeds both ran, in percentage points, with its 95 % t-interval and the "
        "two-sided paired t-test's p-value: runs with the same seed share data order and initial weights, so "
        f"pairing removes what the seed does to both. Verdict: better or worse when p < 0.05, else no clear "
        f"difference; with fewer than {MIN_SEEDS} seeds, needs more seeds.",
        *([f"- {CHANGES_IMAGES_MARK} marks a method that trains on images it changes (mixed pairs, extra distorted "
           f"views: {', '.join(marked)}): part of its difference to `{REFERENCE}` is the data's, not the "
           "distillation's; `mixup`, which mixes pairs and distils nothing, is the baseline that separates the two "
           "(`--baselines mixup`)."] if marked else []),
        *([f"- **The verdicts need more seeds**: this comparison has {pairs} paired "
           f"seed{'s' if pairs != 1 else ''}; rerun with `--seeds 0,1,2` (finished runs are kept)."]
          if pairs < MIN_SEEDS else []),
        *(["- **(teacher)**: the method distils from a separately trained teacher, which runs in every training "
            "step (its forward is in train s / run; its own training is not). " + "; ".join(teachers.values()) + "."]
          if teachers else []),
        "- Method parameters (`--set method.x=...` applies to the main method only; the others use their "
        "defaults, or `--baseline-set method.x=...`):",
        *[f"  {line}" for line in _method_parameters(comparison)],
        f"- Per-run numbers: `{comparison.folder.results.name}`; run folders: "
        f"`{comparison_run_name('<method>', '<seed>')}/`; the recipe: `{comparison.folder.record.name}`.",
        "",
    ]
    return "\n".join(lines)


def write_tables(comparison: ComparisonPlan, failed: Optional[dict] = None):
    """Write results.csv, summary.csv and summary.md into the comparison folder, each atomically (readable at any
    moment); runs not finished make them partial (results.csv: their status; summary.md: a notice). `failed`:
    the runs that failed, with why. Returns (results, summary)."""
    results = results_table(comparison, failed)
    finished = results[results["status"] == "finished"].infer_objects()  # numbers, not the pending rows' None
    summary = summary_table(finished, best_chosen_on="val" if comparison.recipe.data.val_split else "test",
                            partial=len(finished) < len(results))
    folder = comparison.folder
    atomic_write_text(folder.results, csv_text(results))
    atomic_write_text(folder.summary, csv_text(summary))
    atomic_write_text(folder.summary_markdown, summary_markdown(comparison, summary, results, failed))
    return results, summary
