"""What a tuning study writes into its folder (runs/study.py names the files): trials.csv, best.yaml,
summary.md and the plots. Rewritten whole after every session of `tune`, from the Optuna storage alone."""

from __future__ import annotations

from typing import Optional

import yaml

from ..analysis.tune_plots import write_study_plots
from ..errors import one_line
from ..safe_io import atomic_write_text, rows_csv_text
from .space import overrides_of

TRIAL_COLUMNS = ["trial", "state", "val_top1", "epochs", "seconds", "run", "worker", "note"]


def counted(trial) -> bool:
    """Whether a trial counts towards --trials: it ran to an answer (complete, pruned, or diverged)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and bool(trial.user_attrs.get("diverged")))


def trial_value(trial) -> Optional[float]:
    """A trial's value: its best validation top-1; a pruned one's last reported."""
    if trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _note(trial, retried_as: dict) -> str:
    if trial.number in retried_as:
        return f"re-run as trial {retried_as[trial.number]}"
    if trial.user_attrs.get("retry_of") is not None:
        return f"re-run of trial {trial.user_attrs['retry_of']}"
    if trial.state.name == "PRUNED":
        return f"pruned at epoch {trial.user_attrs.get('pruned_at', max(trial.intermediate_values, default=0))}"
    if trial.user_attrs.get("error"):
        return one_line(trial.user_attrs["error"], 160)
    if trial.user_attrs.get("crash"):  # its job crashed (tune --jobs, --ray)
        return one_line(trial.user_attrs["crash"], 160)
    return ""


def trial_rows(study) -> list[dict]:
    trials = study.study.get_trials(deepcopy=False)
    keys = [d.key for d in study.dims if d.low is not None or d.choices is not None]
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if t.user_attrs.get("retry_of") is not None}
    rows = []
    for trial in trials:
        value = trial_value(trial)
        row = {"trial": trial.number, "state": trial.state.name.lower(),
               "val_top1": "" if value is None else round(value, 4), "epochs": len(trial.intermediate_values),
               "seconds": round(trial.duration.total_seconds(), 1) if trial.duration else "",
               "run": trial.user_attrs.get("run", ""), "worker": trial.user_attrs.get("worker", ""),
               "note": _note(trial, retried_as)}
        row.update({key: trial.params.get(key, "") for key in keys})
        rows.append(row)
    return rows


def best_overrides(study) -> Optional[dict]:
    """The recipe overrides of the best complete trial (its parameters and the space's fixed keys)."""
    complete = [t for t in study.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    values = {d.key: d.fixed for d in study.dims if d.low is None and d.choices is None}
    values.update(best.params)
    nested = overrides_of(values)
    nested["method"] = {"name": study.method, **nested.get("method", {})}
    return {"overrides": nested, "trial": best.number, "val_top1": float(best.value)}


def _csv(rows: list[dict]) -> str:
    return rows_csv_text(list(rows[0]) if rows else TRIAL_COLUMNS, rows)  # notes hold error text: no formulas


def summary_markdown(study, rows: list[dict], best: Optional[dict], plot_notes: list[str]) -> str:
    epochs = study.recipe.train.epochs
    done = [t for t in study.study.get_trials(deepcopy=False) if counted(t)]
    trained = sum(len(t.intermediate_values) for t in done)
    budget = len(done) * epochs
    states: dict = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    lines = [f"# Tuning study `{study.name}`", "",
             f"- Method `{study.method}` on recipe `{study.recipe.name}` ({epochs} epochs a trial, seed "
             f"{study.recipe.train.seed}), maximising the best validation top-1 ({study.recipe.data.val_split} "
             "training images held out); the test set plays no part.",
             f"- Trials: {len(done)} of {study.settings.trials} counted; states: "
             + ", ".join(f"{n} {s}" for s, n in states.items()) + ".",
             f"- Pruner `{study.settings.pruner}`: {trained} of {budget} epochs trained"
             + (f" ({100 * (1 - trained / budget):.0f} % of the budget saved)." if budget else "."),
             "- Space: " + "; ".join(f"`{d.describe()}`" for d in study.dims) + ".", ""]
    if best is not None:
        lines += [f"**Best: trial {best['trial']}, val top-1 {best['val_top1']:.2f} %**, with "
                  + ", ".join(f"`{section}.{k}={v}`" for section, values in best["overrides"].items()
                              for k, v in values.items() if k != "name")
                  + f". Its overrides are in `{study.folder.best.name}` (run them with `ipasdctl compare --tuned "
                  f"{study.folder.path}`).", ""]
    else:
        lines += ["No trial has completed yet.", ""]
    ranked = sorted(rows, key=lambda r: -(r["val_top1"] if r["val_top1"] != "" else -1.0))
    if ranked:
        columns = list(ranked[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in ranked]
    if plot_notes:
        lines += ["", "Plots not drawn yet: " + "; ".join(plot_notes) + "."]
    return "\n".join(lines) + "\n"


def write_outputs(study) -> None:
    folder = study.folder
    rows = trial_rows(study)
    atomic_write_text(folder.trials, _csv(rows))
    best = best_overrides(study)
    if best is not None:
        header = (f"# The best trial of study {study.name}: trial {best['trial']}, val top-1 {best['val_top1']:.2f} %.\n"
                  "# Recipe overrides: `ipasdctl compare --tuned STUDY` runs the method with them.\n")
        atomic_write_text(folder.best, header + yaml.safe_dump(best["overrides"], sort_keys=False))
    _, notes = write_study_plots(study.study, folder.plots)
    atomic_write_text(folder.summary_markdown, summary_markdown(study, rows, best, notes))
