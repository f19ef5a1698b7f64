"""Every figure of eval and report: matplotlib's object-oriented API on the Agg canvas (no display, no pyplot
global state), written atomically. matplotlib is imported here and nowhere else."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..safe_io import atomic_write_bytes


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_figure(figure, path: Path) -> Path:
    """PNG, written atomically (a half-written plot never replaces a good one)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


CONFIDENCE_LABEL = "confidence (max softmax probability), 15 equal-width bins"


def integer_epochs(ax) -> None:
    """Epoch ticks at whole epochs only (a 4-epoch run would get 1.25, 1.50, ... otherwise)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
    ax_counts.set_xlabel(CONFIDENCE_LABEL)
    ax_counts.set_ylabel("images (%)")
    ax_counts.grid(alpha=0.3)


def plot_reliability(bins: dict, ece: float, path: Path, title: str) -> Path:
    figure = new_figure(5.5, 6.0)
    ax, ax_counts = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    draw_reliability(ax, ax_counts, bins, f"ECE = {100 * ece:.2f}%\n{sum(bins['count'])} test images")
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    figure.suptitle(f"Reliability diagram\n{title}", fontsize=11)
    return save_figure(figure, path)


def draw_tsne(ax, coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], legend: bool = True,
              min_size: float = 3.0):
    """Points coloured by class (a legend up to 20 classes, else a colour scale); returns the last scatter.
    `min_size`: the smallest marker area (pt^2), however many points there are."""
    num_classes = max(len(class_names), int(labels.max()) + 1 if labels.size else 1)
    size = float(np.clip(6000.0 / max(len(labels), 1), min_size, 25.0))
    points = None
    if num_classes <= 20:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
        for c in range(num_classes):
            mask = labels == c
            if mask.any():
                name = class_names[c] if c < len(class_names) else str(c)
                points = ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=cmap(c), label=name, alpha=0.8,
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
    return points


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
        # epochs without a test pass (train.eval_every) have empty test cells: the line joins the evaluated ones
        frames = [f[["epoch", "test_top1"]].dropna() for f in frames if {"epoch", "test_top1"} <= set(f.columns)]
        frames = [f for f in frames if len(f)]
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
    integer_epochs(ax)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"Test top-1 by epoch — {title}\n(line: mean over seeds; band: min–max over seeds)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_figure(figure, path)


def loss_columns(frame) -> list[str]:
    return [c for c in frame.columns if c == "train_loss" or c.startswith("loss_")]


def loss_curves(frames: list) -> dict:
    """Legend label -> the mean over seeds by epoch of train_loss (the total the method minimises) and of each
    loss_* term, as the method logs it: unweighted, before the weight it has in the total (IPASD's loss_con
    enters as w_con * loss_con), and the legend says so. A term equal to the total at every epoch (ce's loss_ce) is not
    drawn a second time: the total's label names it."""
    import pandas as pd

    stacked = pd.concat([f[["epoch", *loss_columns(f)]] for f in frames]).groupby("epoch").mean()
    total = stacked["train_loss"] if "train_loss" in stacked else None
    same = [t for t in stacked.columns if t != "train_loss" and total is not None
            and np.allclose(stacked[t].values, total.values, rtol=1e-5, atol=1e-7, equal_nan=True)]
    curves = {}
    if total is not None:
        curves["train_loss (total" + "".join(f" = {t}" for t in same) + ")"] = total
    for term in stacked.columns:
        if term != "train_loss" and term not in same:
            curves[f"{term} (unweighted)"] = stacked[term]
    return curves


def plot_loss_terms(curves: dict, path: Path, title: str) -> Path:
    """One panel per method: train_loss and every loss_* term (loss_curves), mean over seeds, by epoch."""
    methods = list(curves)
    columns = min(len(methods), 3)
    rows = math.ceil(len(methods) / columns)
    figure = new_figure(4.6 * columns, 3.6 * rows + 0.6)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, method in zip(axes, methods):
        frames = curves[method]
        for label, values in loss_curves(frames).items():
            total = label.startswith("train_loss")
            ax.plot(values.index, values.values, linewidth=2.2 if total else 1.4, linestyle="-" if total else "--",
                    label=label, marker="o" if len(values) <= 12 else None, markersize=3)
        ax.set_title(f"{method} ({len(frames)} seed{'s' if len(frames) != 1 else ''})", fontsize=10)
        ax.set_xlabel("epoch")
        integer_epochs(ax)
        ax.set_ylabel("loss (nats, epoch mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    figure.suptitle(f"Training loss and its terms per method — {title}\n(each term unweighted, as computed before "
                    "its weight in the total)", fontsize=11)
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
        # side by side, the full label is wider than its panel and runs into the next one's: the short one here,
        # the binning in the title
        axes[1, i].set_xlabel("confidence (max softmax probability)", fontsize=9)
        axes[1, i].set_xticks([0.0, 0.5, 1.0])
        if i > 0:
            axes[0, i].set_ylabel("")
            axes[1, i].set_ylabel("")
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9,
                  frameon=False)
    figure.suptitle(f"Reliability per method (15 equal-width confidence bins, pooled over seeds) — {title}",
                    fontsize=11)
    return save_figure(figure, path)


def plot_eval_tsne(per_method: dict, class_names: Sequence[str], path: Path, title: str) -> Path:
    """per_method: method -> (coords, labels, seed): one square t-SNE panel per method, three to a row, one
    legend (or colour scale) for all; markers large enough to see at the size a report shows the figure."""
    methods = list(per_method)
    columns = min(len(methods), 3)
    rows = math.ceil(len(methods) / columns)
    figure = new_figure(4.0 * columns + 1.6, 4.0 * rows + 0.7)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    points = None
    for ax, method in zip(axes, methods):
        coords, labels, seed = per_method[method]
        points = draw_tsne(ax, coords, labels, class_names, legend=False, min_size=8.0)
        ax.set_box_aspect(1)
        ax.set_title(f"{method} (seed {seed}, {len(labels)} images)", fontsize=10)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:  # up to 20 classes: one legend beside the grid
        figure.legend(handles, names, title="class", loc="outside right center", fontsize=8, title_fontsize=9,
                      markerscale=2.0, frameon=False)
    elif points is not None:
        figure.colorbar(points, ax=list(axes[:len(methods)]), label="class index", shrink=0.8)
    figure.suptitle(f"t-SNE of test embeddings, coloured by class — {title}", fontsize=11)
    return save_figure(figure, path)


PRECISION_MARKERS = {"fp32": "o", "int8": "s", "fp16": "^"}
PARETO_COLOURS = 10  # up to this many models get a colour each; beyond, a colour per `group` (tab10 stays legible)


def plot_pareto(panels: dict, path: Path, title: str) -> Path:
    """panels: batch size -> selection rows measured at that batch size (columns label, precision, top1,
    latency_ms, pareto_optimal; optional group). Top-1 against latency (log scale), one panel per batch size: a
    colour per model (per group beyond PARETO_COLOURS models), a marker per precision, the Pareto-optimal points
    ringed, named and joined by the front (the best top-1 within each latency). Rows without a measured latency
    are left out."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = new_figure(5.2 * len(panels) + 3.2, 4.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    labels = sorted({str(label) for table in panels.values() for label in table["label"]})
    key = "group" if len(labels) > PARETO_COLOURS and all("group" in t for t in panels.values()) else "label"
    keys = sorted({str(value) for table in panels.values() for value in table[key]})
    colours = method_colours(keys)
    for ax, (batch_size, table) in zip(axes, panels.items()):
        latency = np.asarray(table["latency_ms"], dtype=np.float64)
        top1 = np.asarray(table["top1"], dtype=np.float64)
        shown = table[np.isfinite(latency) & np.isfinite(top1)]
        for row in shown.itertuples(index=False):
            ax.scatter(row.latency_ms, row.top1, s=70 if row.pareto_optimal else 42, zorder=3,
                       marker=PRECISION_MARKERS.get(str(row.precision), "D"), color=colours[str(getattr(row, key))],
                       edgecolors="black" if row.pareto_optimal else "none", linewidths=1.2)
            if row.pareto_optimal:
                ax.annotate(f"{row.label} ({row.precision})", (row.latency_ms, row.top1), textcoords="offset points",
                            xytext=(6, -3), fontsize=7, zorder=4)
        front = shown[shown["pareto_optimal"].astype(bool)].sort_values("latency_ms")
        if len(front):
            ax.step(front["latency_ms"], front["top1"], where="post", color="black", linewidth=1, alpha=0.6, zorder=2)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.2, 0.5, 1, 2, ...: plain numbers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"latency (ms per batch of {batch_size}, onnxruntime CPU, p50; log scale)")
        ax.set_ylabel("test top-1 (%) in onnxruntime")
        ax.set_title(f"batch {batch_size}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], linestyle="none", marker="o", color=colours[k], label=k) for k in keys]
    handles += [Line2D([], [], linestyle="none", marker=marker, color="black", fillstyle="none", label=precision)
                for precision, marker in PRECISION_MARKERS.items()
                if any((t["precision"] == precision).any() for t in panels.values())]
    handles.append(Line2D([], [], color="black", alpha=0.6, marker="o", markerfacecolor="none",
                          label="Pareto front (ringed)"))
    figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.suptitle(f"Test top-1 against latency — {title}", fontsize=11)
    return save_figure(figure, path)
