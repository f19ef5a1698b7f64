"""`ipasdctl report`: plots and a Markdown report from run folders and comparison folders.

Plots use matplotlib's object-oriented API on the Agg canvas (no display, no pyplot global state) and are
written atomically. Runs are grouped by (data set, arch): every group gets its summary table (mean ± std
over seeds), test top-1 by epoch (mean over seeds, band = min..max over seeds), the loss terms per method,
and the eval plots per method side by side (reliability bins pooled over seeds; the t-SNE of the lowest
seed). Runs without eval.json are evaluated first (ipasdctl.evaluation).
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_text

RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "best_top1", "last_top1", "best_epoch",
                  "best_top5", "params", "macs", "train_seconds", "images_per_second", "run_dir"]


# ------------------------------------------------------------------------------------------------ figures


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_figure(figure, path: Path) -> Path:
    """PNG, written atomically (a half-written plot never replaces a good one)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def draw_reliability(ax, ax_counts, bins: dict, ece_text: str) -> None:
    """Accuracy per confidence bin against the diagonal (top) and the share of images per bin (bottom)."""
    lower = np.asarray(bins["lower"], dtype=float)
    upper = np.asarray(bins["upper"], dtype=float)
    width = upper - lower
    count = np.asarray(bins["count"], dtype=float)
    filled = count > 0
    accuracy = np.array([a if a is not None else 0.0 for a in bins["accuracy"]])
    confidence = np.array([c if c is not None else 0.0 for c in bins["confidence"]])
    ax.plot([0, 1], [0, 1], "--", color="0.3", linewidth=1, label="perfect calibration")
    ax.bar(lower[filled], accuracy[filled], width=width[filled], align="edge", color="tab:blue", alpha=0.85,
           edgecolor="white", label="accuracy in bin")
    gap_bottom = np.minimum(accuracy, confidence)[filled]
    gap_height = np.abs(confidence - accuracy)[filled]
    ax.bar(lower[filled], gap_height, bottom=gap_bottom, width=width[filled], align="edge", facecolor="none",
           edgecolor="tab:red", hatch="///", linewidth=0.8, label="gap to mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (fraction correct)")
    ax.text(0.03, 0.96, ece_text, transform=ax.transAxes, va="top", ha="left", fontsize=10,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "edgecolor": "0.7"})
    ax.grid(alpha=0.3)
    share = 100.0 * count / max(count.sum(), 1.0)
    ax_counts.bar(lower, share, width=width, align="edge", color="0.5", edgecolor="white")
    ax_counts.set_xlim(0, 1)
    ax_counts.set_xlabel("confidence (max softmax probability), 15 equal-width bins")
    ax_counts.set_ylabel("images (%)")
    ax_counts.grid(alpha=0.3)


def plot_reliability(bins: dict, ece: float, path: Path, title: str) -> Path:
    figure = new_figure(5.5, 6.0)
    ax, ax_counts = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    draw_reliability(ax, ax_counts, bins, f"ECE = {100 * ece:.2f}%\n{sum(bins['count'])} test images")
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    figure.suptitle(f"Reliability diagram\n{title}", fontsize=11)
    return save_figure(figure, path)


def draw_tsne(ax, coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], legend: bool = True) -> None:
    num_classes = max(len(class_names), int(labels.max()) + 1 if labels.size else 1)
    size = float(np.clip(6000.0 / max(len(labels), 1), 3.0, 25.0))
    if num_classes <= 20:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
        for c in range(num_classes):
            mask = labels == c
            if mask.any():
                name = class_names[c] if c < len(class_names) else str(c)
                ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=cmap(c), label=name, alpha=0.8,
                           linewidths=0)
        if legend:
            ax.legend(title="class", fontsize=7, title_fontsize=8, markerscale=max(1.0, 20.0 / size) ** 0.5,
                      loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        points = ax.scatter(coords[:, 0], coords[:, 1], s=size, c=labels, cmap="turbo", vmin=0,
                            vmax=num_classes - 1, alpha=0.8, linewidths=0)
        if legend:
            ax.figure.colorbar(points, ax=ax, label="class index")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1 (no units)")
    ax.set_ylabel("t-SNE 2 (no units)")


def plot_tsne(coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> Path:
    figure = new_figure(7.0, 5.5)
    ax = figure.subplots()
    draw_tsne(ax, coords, labels, class_names)
    ax.set_title(f"t-SNE of test embeddings, coloured by class ({len(labels)} images)\n{title}", fontsize=11)
    return save_figure(figure, path)


def method_colours(methods: Sequence[str]) -> dict:
    from matplotlib import colormaps

    # tab10 up to 10 methods; beyond that tab20, so that every method of a full comparison has its own colour
    if len(methods) <= 10:
        cmap = colormaps["tab10"]
        return {m: cmap(i) for i, m in enumerate(methods)}
    cmap = colormaps["tab20"]
    return {m: cmap(i % 20) for i, m in enumerate(methods)}


def plot_training_curves(curves: dict, path: Path, title: str) -> Path:
    """curves: method -> list of metrics DataFrames (one per seed). Mean test top-1, band min..max over seeds."""
    import pandas as pd

    figure = new_figure(7.5, 4.8)
    ax = figure.subplots()
    colours = method_colours(list(curves))
    for method, frames in curves.items():
        frames = [f[["epoch", "test_top1"]] for f in frames if {"epoch", "test_top1"} <= set(f.columns)]
        if not frames:
            continue
        stacked = pd.concat(frames).groupby("epoch")["test_top1"]
        mean, low, high = stacked.mean(), stacked.min(), stacked.max()
        label = f"{method} ({len(frames)} seed{'s' if len(frames) != 1 else ''})"
        ax.plot(mean.index, mean.values, color=colours[method], linewidth=1.8, label=label,
                marker="o" if len(mean) <= 12 else None, markersize=3)
        if len(frames) > 1:
            ax.fill_between(mean.index, low.values, high.values, color=colours[method], alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"Test top-1 by epoch — {title}\n(line: mean over seeds; band: min–max over seeds)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_figure(figure, path)


def loss_columns(frame) -> list[str]:
    return [c for c in frame.columns if c == "train_loss" or c.startswith("loss_")]


def plot_loss_terms(curves: dict, path: Path, title: str) -> Path:
    """One panel per method: train_loss and every loss_* term, mean over seeds, by epoch."""
    import pandas as pd

    methods = list(curves)
    columns = min(len(methods), 3)
    rows = math.ceil(len(methods) / columns)
    figure = new_figure(4.6 * columns, 3.6 * rows + 0.6)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, method in zip(axes, methods):
        frames = curves[method]
        stacked = pd.concat([f[["epoch", *loss_columns(f)]] for f in frames]).groupby("epoch").mean()
        for term in stacked.columns:
            ax.plot(stacked.index, stacked[term].values, linewidth=2.2 if term == "train_loss" else 1.4,
                    linestyle="-" if term == "train_loss" else "--", label=term,
                    marker="o" if len(stacked) <= 12 else None, markersize=3)
        ax.set_title(f"{method} ({len(frames)} seed{'s' if len(frames) != 1 else ''})", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (nats, epoch mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    figure.suptitle(f"Training loss terms per method — {title}", fontsize=11)
    return save_figure(figure, path)


def plot_eval_reliability(per_method: dict, path: Path, title: str) -> Path:
    """per_method: method -> (pooled bins, list of ECEs): one reliability panel per method, side by side."""
    methods = list(per_method)
    figure = new_figure(4.0 * len(methods) + 0.4, 5.6)
    axes = figure.subplots(2, len(methods), sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for i, method in enumerate(methods):
        bins, eces = per_method[method]
        ece_text = f"ECE {100 * np.mean(eces):.2f}" + (f" ± {100 * np.std(eces, ddof=1):.2f}" if len(eces) > 1 else "") + " %"
        draw_reliability(axes[0, i], axes[1, i], bins, f"{ece_text}\n{len(eces)} seed{'s' if len(eces) != 1 else ''}")
        axes[0, i].set_title(method, fontsize=10)
        if i > 0:
            axes[0, i].set_ylabel("")
            axes[1, i].set_ylabel("")
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9,
                  frameon=False)
    figure.suptitle(f"Reliability per method (bins pooled over seeds) — {title}", fontsize=11)
    return save_figure(figure, path)


def plot_eval_tsne(per_method: dict, class_names: Sequence[str], path: Path, title: str) -> Path:
    """per_method: method -> (coords, labels, seed): one t-SNE panel per method, side by side."""
    methods = list(per_method)
    figure = new_figure(4.2 * len(methods) + 1.4, 4.6)
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    for i, method in enumerate(methods):
        coords, labels, seed = per_method[method]
        draw_tsne(axes[i], coords, labels, class_names, legend=i == len(methods) - 1)
        axes[i].set_title(f"{method} (seed {seed}, {len(labels)} images)", fontsize=10)
    figure.suptitle(f"t-SNE of test embeddings, coloured by class — {title}", fontsize=11)
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    run_dir: Path
    row: dict  # the RESULT_COLUMNS of this run
    source: Path  # the comparison folder it came from, or the run folder itself
    metrics: Optional[object] = None  # metrics.csv as a DataFrame
    eval: Optional[dict] = None


def is_comparison_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "results.csv").is_file()


def run_row(run_dir: Path) -> dict:
    """The results.csv row of one run folder, from summary.json (or config.yaml + metrics.csv if unfinished)."""
    import pandas as pd
    import yaml

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            summary = {}
    else:
        summary = {}
    if not summary:
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            raise UserError(f"{run_dir / 'config.yaml'} is not readable YAML; is {run_dir} a run folder?") from None
        summary = {"method": (config.get("method") or {}).get("name"), "seed": (config.get("train") or {}).get("seed"),
                   "arch": (config.get("model") or {}).get("arch"), "dataset": (config.get("data") or {}).get("name"),
                   "epochs": (config.get("train") or {}).get("epochs")}
        metrics_path = run_dir / "metrics.csv"
        if metrics_path.is_file():
            frame = pd.read_csv(metrics_path)
            if len(frame):
                best = frame["test_top1"].idxmax()
                summary.update(best_top1=frame["test_top1"].max(), last_top1=frame["test_top1"].iloc[-1],
                               best_epoch=int(frame["epoch"][best]), best_top5=frame["test_top5"][best])
    row = {column: summary.get(column) for column in RESULT_COLUMNS}
    row["run_dir"] = str(run_dir)
    return row


def resolve_run_dir(comparison: Path, row: dict) -> Optional[Path]:
    candidates = []
    value = row.get("run_dir")
    if isinstance(value, str) and value:
        candidates += [Path(value), comparison / value, comparison / Path(value).name]
    candidates.append(comparison / f"{row.get('method')}-s{row.get('seed')}")
    for candidate in candidates:
        if candidate.is_dir() and (candidate / "config.yaml").is_file():
            return candidate
    return None


def collect_runs(dirs: Sequence[Path]) -> tuple[list[Run], list[Path]]:
    """Every run of the given run folders and comparison folders (deduplicated), and the comparison folders."""
    import pandas as pd

    from .evaluation import is_run_folder

    runs: dict[Path, Run] = {}
    comparisons: list[Path] = []
    for directory in map(Path, dirs):
        if is_comparison_folder(directory):
            comparisons.append(directory)
            try:
                table = pd.read_csv(directory / "results.csv")
            except (ValueError, OSError) as exc:
                raise UserError(f"{directory / 'results.csv'} is not a readable CSV ({exc}); rerun `ipasdctl compare`") from None
            missing = {"method", "seed"} - set(table.columns)
            if missing:
                raise UserError(f"{directory / 'results.csv'} lacks the columns {', '.join(sorted(missing))}; "
                                "it is not a comparison written by `ipasdctl compare`")
            for record in table.to_dict("records"):
                run_dir = resolve_run_dir(directory, record)
                if run_dir is None:
                    print(f"warning: {directory}: no run folder for {record.get('method')} seed "
                          f"{record.get('seed')}; it is left out of the report", file=sys.stderr)
                    continue
                row = {column: record.get(column) for column in RESULT_COLUMNS}
                own = run_row(run_dir)
                for column in RESULT_COLUMNS:  # fill what results.csv lacks from the run folder itself
                    if row[column] is None or (isinstance(row[column], float) and math.isnan(row[column])):
                        row[column] = own[column]
                row["run_dir"] = str(run_dir)
                runs.setdefault(run_dir.resolve(), Run(run_dir, row, directory))
        elif is_run_folder(directory) or (directory / "config.yaml").is_file() and (directory / "metrics.csv").is_file():
            runs.setdefault(directory.resolve(), Run(directory, run_row(directory), directory))
        else:
            raise UserError(f"{directory} is neither a run folder (config.yaml, checkpoints/) nor a comparison folder "
                            "(results.csv); pass folders written by `ipasdctl train` or `ipasdctl compare`")
    for run in runs.values():
        metrics_path = run.run_dir / "metrics.csv"
        if metrics_path.is_file():
            try:
                run.metrics = pd.read_csv(metrics_path)
            except (ValueError, OSError):
                print(f"warning: {metrics_path} is not a readable CSV; no curves for this run", file=sys.stderr)
    return list(runs.values()), comparisons


# ------------------------------------------------------------------------------------------------ tables


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values, digits: int = 2, scale: float = 1.0) -> str:
    values = [float(v) * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def human_count(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(value):
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def summary_rows(runs_by_method: dict) -> tuple[list[str], list[list[str]], list[dict]]:
    """The group's summary table: training results and eval metrics, mean ± std over seeds."""
    header = ["method", "seeds", "best top-1 (%)", "last top-1 (%)", "best top-5 (%)", "eval top-1 (%)",
              "NLL (nats)", "ECE (%)", "cos to class mean", "intra/inter dist.", "params", "MACs",
              "train time (s)", "train img/s"]
    rows, records = [], []
    for method, runs in runs_by_method.items():
        def col(name):
            return [r.row.get(name) for r in runs]

        evals = [r.eval for r in runs if r.eval]
        rows.append([
            method, ", ".join(str(s) for s in sorted(col("seed"), key=seed_key)),
            mean_std(col("best_top1")), mean_std(col("last_top1")), mean_std(col("best_top5")),
            mean_std([e["top1"] for e in evals]), mean_std([e["nll"] for e in evals], 4),
            mean_std([e["ece"] for e in evals], 2, 100.0),
            mean_std([e["compactness"]["mean_cosine_to_class_mean"] for e in evals], 4),
            mean_std([e["compactness"]["intra_inter_distance_ratio"] for e in evals], 4),
            human_count(runs[0].row.get("params")), human_count(runs[0].row.get("macs")),
            mean_std(col("train_seconds"), 1), mean_std(col("images_per_second"), 0),
        ])
        for run in runs:
            record = dict(run.row)
            if run.eval:
                record.update(eval_top1=run.eval["top1"], eval_top5=run.eval["top5"], nll=run.eval["nll"],
                              ece=run.eval["ece"], **{k: v for k, v in run.eval["compactness"].items()})
            records.append(record)
    return header, rows, records


SELECTION_SHOWN = ["dataset", "method", "arch", "precision", "seeds", "top1", "top1_std", "params", "macs",
                   "file_size_mb", "latency_ms", "pareto_optimal", "within_budget"]


def selection_section(comparisons: list[Path], exports: Path, max_latency_ms: Optional[float], out: Path) -> list[str]:
    """The deployment selection table of ipasdctl.selection (accuracy against latency, Pareto set, budget)."""
    lines = ["## Selection (exported models)", ""]
    try:
        from .selection import best_under_budget, selection_table, write_selection
    except ImportError:
        return lines + ["_No selection table: this installation lacks ipasdctl.selection._", ""]
    if not comparisons:
        return lines + ["_No selection table: it is built from comparison folders (results.csv); none was given._", ""]
    table = selection_table(comparisons, exports, max_latency_ms)
    write_selection(table, out / "selection.csv")
    budget = f" under {max_latency_ms:g} ms" if max_latency_ms is not None else ""
    shown = [c for c in SELECTION_SHOWN if c in table.columns]
    lines += [f"From `{exports}`: test top-1 (%, mean over seeds), latency (ms, onnxruntime CPU, batch 1, p50), "
              "Pareto-optimal per data set on (top-1, latency). Every column: selection.csv.", "",
              markdown_table(shown, [[human_count(v) if c in ("params", "macs") else format_cell(v) for c, v in zip(shown, row)]
                                     for row in table[shown].itertuples(index=False)]), ""]
    if max_latency_ms is not None:
        best = best_under_budget(table, max_latency_ms)
        if best.empty:
            lines += [f"**No model meets the budget{budget}** (or none has a measured latency: run `ipasdctl bench`).", ""]
        else:
            for row in best.to_dict("records"):
                lines += [f"**Best{budget} on {row['dataset']}:** {row['method']} / {row['arch']} ({row['precision']}): "
                          f"top-1 {format_cell(row['top1'])} %, {format_cell(row['latency_ms'])} ms", ""]
    return lines


def format_cell(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------------------------------------ report


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


def epochs_text(value) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return "?"


def is_stale(result: dict, row: dict) -> bool:
    """An eval.json of the best checkpoint from before the run improved (resumed or extended since)."""
    try:
        return result.get("checkpoint") == "best" and int(result["epoch"]) != int(row.get("best_epoch"))
    except (KeyError, TypeError, ValueError):
        return False


def seed_key(seed) -> tuple:
    """Seeds in numeric order (a missing or odd seed last)."""
    try:
        return (0, int(seed), "")
    except (TypeError, ValueError):
        return (1, 0, str(seed))


def slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts))


def build_report(dirs: Sequence[Path], out: Optional[Path] = None, exports: Optional[Path] = None,
                 max_latency_ms: Optional[float] = None, data_root: Optional[Path] = None, device: str = "auto",
                 tsne_points: Optional[int] = None) -> Path:
    """Write report.md and its images into `out` (default: the first folder); returns report.md's path."""
    from . import evaluation

    if not dirs:
        raise UserError("report needs at least one run folder or comparison folder")
    for directory in dirs:
        if not Path(directory).is_dir():
            raise UserError(f"{directory} does not exist or is not a folder; pass run folders or comparison folders")
    if exports is not None and not Path(exports).is_dir():
        raise UserError(f"--exports {exports} is not a folder; export models first (ipasdctl export) or drop --exports")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UserError(f"--max-latency-ms must be positive, got {max_latency_ms}")
    runs, comparisons = collect_runs(dirs)
    if not runs:
        raise UserError("no runs found in the given folders; train or compare first")
    out = Path(out) if out is not None else Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)

    skipped: list[str] = []
    for run in runs:
        run.eval = evaluation.load_eval(run.run_dir)
        if run.eval is not None and is_stale(run.eval, run.row):
            run.eval = None
        if run.eval is None and (run.run_dir / "checkpoints" / "best.pt").is_file():
            print(f"evaluating {run.run_dir} ...", file=sys.stderr)
            try:
                run.eval = evaluation.evaluate_run(run.run_dir, "best", data_root, device,
                                                   tsne_points=tsne_points or evaluation.TSNE_POINTS)
            except UserError as exc:
                skipped.append(f"{run.run_dir}: {exc}")
                print(f"warning: eval of {run.run_dir} skipped: {exc}", file=sys.stderr)

    groups = group_runs(runs)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# ipasdctl report", "", f"Generated {now} from: " + ", ".join(f"`{d}`" for d in dirs) + ".", ""]
    all_records = []
    for (dataset, arch, epochs), by_method in groups.items():
        title = f"{dataset}, {arch}, {epochs} epochs"
        name = slug(dataset, arch, f"{epochs}ep")
        lines += [f"## {title}", ""]
        header, rows, records = summary_rows(by_method)
        all_records += records
        used = sorted({r.eval.get("checkpoint", "best") for rs in by_method.values() for r in rs if r.eval})
        checkpoints = f"{used[0]} checkpoint" if len(used) == 1 else f"checkpoints: {', '.join(used)}"
        lines += ["Mean ± std over seeds. Top-1 from training (best epoch / last epoch); eval columns from eval.json "
                  f"({checkpoints}; ECE: 15 equal-width bins; compactness on L2-normalised embeddings, "
                  "intra/inter = mean same-class / mean different-class pair distance, lower is tighter).", "",
                  markdown_table(header, rows), ""]

        curves = {m: [r.metrics for r in rs if r.metrics is not None and len(r.metrics)] for m, rs in by_method.items()}
        curves = {m: frames for m, frames in curves.items() if frames}
        if curves:
            curve_png = plot_training_curves(curves, out / f"curves-{name}.png", title)
            lines += ["### Test top-1 by epoch", "", f"![Test top-1 by epoch, {title}]({curve_png.name})", ""]
            with_terms = {m: frames for m, frames in curves.items() if any(loss_columns(f) for f in frames)}
            if with_terms:
                loss_png = plot_loss_terms(with_terms, out / f"loss_terms-{name}.png", title)
                lines += ["### Loss terms", "", f"![Training loss terms per method, {title}]({loss_png.name})", ""]

        reliability, tsne, class_names = {}, {}, None
        for method, method_runs in by_method.items():
            evaluated = [r for r in method_runs if r.eval]
            if not evaluated:
                continue
            from .metrics import pool_reliability_bins

            reliability[method] = (pool_reliability_bins([r.eval["reliability"] for r in evaluated]),
                                   [r.eval["ece"] for r in evaluated])
            first = min(evaluated, key=lambda r: seed_key(r.row.get("seed")))
            tsne_path = first.run_dir / "embedding_tsne.csv"
            if tsne_path.is_file():
                coords, labels = evaluation.read_tsne_csv(tsne_path)
                tsne[method] = (coords, labels, first.row.get("seed"))
            if class_names is None and (first.run_dir / "per_class.csv").is_file():
                import pandas as pd

                class_names = [str(c) for c in pd.read_csv(first.run_dir / "per_class.csv")["class_name"]]
        if reliability:
            lines += [f"### Calibration and embeddings ({checkpoints})", ""]
            rel_png = plot_eval_reliability(reliability, out / f"eval_reliability-{name}.png", title)
            lines += [f"![Reliability per method, {title}]({rel_png.name})", ""]
        if tsne:
            if class_names is None:
                class_names = [str(c) for c in range(int(max(t[1].max() for t in tsne.values())) + 1)]
            tsne_png = plot_eval_tsne(tsne, class_names, out / f"eval_tsne-{name}.png", title)
            lines += [f"![t-SNE of test embeddings per method, {title}]({tsne_png.name})", ""]

    if all_records:
        import pandas as pd

        atomic_write_text(out / "report_runs.csv", pd.DataFrame(all_records).to_csv(index=False, float_format="%.6g"))
        lines += ["Every run, with its eval metrics: report_runs.csv.", ""]
    for comparison in comparisons:
        if (comparison / "summary.md").is_file():
            lines += [f"The comparison's own summary (reference method, parameters): `{comparison / 'summary.md'}`.", ""]
    if exports is not None:
        lines += selection_section(comparisons, Path(exports), max_latency_ms, out)
    if skipped:
        lines += ["## Not evaluated", ""] + [f"- {s}" for s in skipped] + [""]
    report_path = out / "report.md"
    atomic_write_text(report_path, "\n".join(lines))
    return report_path
