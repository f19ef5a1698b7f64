"""`ipasdctl report`: plots and a Markdown report from run folders and comparison folders.

Runs are grouped by (data set, arch, epochs): every group gets its summary table (mean ± std over seeds, the
95 % interval of last-epoch top-1 as summary.md gives it; methods ranked by last-epoch top-1, as summary.md
ranks them), test top-1 by epoch (mean over seeds, band = min..max over seeds), the loss terms per method, and
the eval plots per method side by side (reliability bins pooled over seeds; the t-SNE of the lowest seed, unless
`with_tsne=False`). Runs without eval.json are evaluated first (evaluation.py).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from ..runs import ComparisonFolder, RunFolder
from ..safe_io import atomic_write_text, csv_text
from . import evaluation, plots
from .collect import collect_runs, group_runs, is_stale
from .metrics import pool_reliability_bins
from .selection import incomplete_rows, latency_batch_sizes, recommend, selection_table, write_selection
from .statistics import ACCURACY_CI_NOTE, MIN_SEEDS, NEEDS_MORE_SEEDS, accuracy_interval
from .tables import format_cell, human_count, markdown_table, mean_std, seed_key, slug


def ranked(runs_by_method: dict) -> dict:
    """Methods by mean last-epoch top-1, highest first (ties: by mean best-epoch top-1), as summary.md ranks."""
    def mean_of(runs, column) -> float:
        values = [float(v) for v in (r.row.get(column) for r in runs) if _is_number(v)]
        return sum(values) / len(values) if values else float("-inf")

    return dict(sorted(runs_by_method.items(),
                       key=lambda item: (-mean_of(item[1], "last_top1"), -mean_of(item[1], "best_top1"))))


def _is_number(value) -> bool:
    try:
        return value is not None and float(value) == float(value)
    except (TypeError, ValueError):
        return False


def _interval_cell(values) -> str:
    _, _, low, high = accuracy_interval([float(v) for v in values if _is_number(v)])
    return "—" if low != low else f"[{low:.2f}, {high:.2f}]"


def summary_rows(runs_by_method: dict) -> tuple[list[str], list[list[str]], list[dict]]:
    """The group's summary table: training results and eval metrics, mean ± std over seeds."""
    header = ["method", "seeds", "best top-1 (%)", "last top-1 (%)", "last top-1 95 % CI", "best top-5 (%)",
              "eval top-1 (%)",
              "NLL (nats)", "ECE (%)", "cos to class mean", "intra/inter dist.", "params", "MACs",
              "train time (s)", "train img/s"]
    rows, records = [], []
    for method, runs in runs_by_method.items():
        def col(name):
            return [r.row.get(name) for r in runs]

        evals = [r.eval for r in runs if r.eval]
        rows.append([
            method, ", ".join(str(s) for s in sorted(col("seed"), key=seed_key)),
            mean_std(col("best_top1")), mean_std(col("last_top1")), _interval_cell(col("last_top1")),
            mean_std(col("best_top5")),
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


SELECTION_SHOWN = ["dataset", "method", "changes_images", "arch", "pruning", "precision", "checkpoint", "seeds", "seeds_compared",
                   "missing_seeds", "top1", "top1_std", "params", "macs", "file_size_mb", "latency_ms",
                   "slower_than_fp32", "pareto_optimal", "within_budget"]


def selection_section(comparisons: list[Path], exports: Path, max_latency_ms: Optional[float], out: Path,
                      run_dirs: Sequence[Path] = ()) -> list[str]:
    """The deployment selection table of ipasdctl.selection (accuracy against latency, Pareto set, budget), of
    the comparisons and of the run folders given alone."""
    lines = ["## Selection (exported models)", ""]
    table = selection_table(comparisons, exports, max_latency_ms, run_dirs=run_dirs)
    write_selection(table, out / "selection.csv")
    shown = [c for c in SELECTION_SHOWN if c in table.columns]
    unmatched = table.attrs.get("unmatched_exports", [])
    if unmatched:
        print(f"warning: {len(unmatched)} export(s) in {exports} match no compared run and are left out of the "
              f"selection: {', '.join(unmatched)}", file=sys.stderr)
    lines += [f"From `{exports}`: top-1 (%) is the test top-1 of the model that ships, measured by the runtime it "
              "ships in (onnxruntime for exported models, on the whole test set), averaged over `seeds` of the "
              "`seeds_compared` seeds; latency (ms, onnxruntime CPU, batch 1, p50); Pareto-optimal per data set on "
              "(top-1, latency). Every column, with PyTorch's best- and last-epoch top-1: selection.csv.", "",
              markdown_table(shown, [[human_count(v) if c in ("params", "macs") else format_cell(v) for c, v in zip(shown, row)]
                                     for row in table[shown].itertuples(index=False)]), ""]
    lines += _pareto_plots(table, comparisons, exports, out, run_dirs)
    picks = recommend(table, max_latency_ms) if max_latency_ms is not None else []
    withheld = {(r["dataset"], _row_name(r)) for pick in picks for r in pick.incomplete}  # said there, not twice
    for row in incomplete_rows(table).to_dict("records"):
        missing = str(row["missing_seeds"]).replace(";", ", ")
        line = (f"{_row_name(row)} stands on {row['seeds']} of the {row['seeds_compared']} compared seeds "
                f"(missing: seed {missing}); its mean is not comparable with the others' and it is not recommended")
        if (row["dataset"], _row_name(row)) not in withheld:
            print(f"warning: {line}; export and bench the missing seeds", file=sys.stderr)
        lines += [f"- {line}.", ""]
    for pick in picks:
        lines += [_recommendation_line(pick, f" under {max_latency_ms:g} ms"), ""]
    slower = table[table["slower_than_fp32"]]
    for row in slower.to_dict("records"):
        lines += [f"- {row['method']} / {row['arch']} {row['precision']} is slower than its fp32 export on this CPU "
                  f"({format_cell(row['latency_ms'])} ms): it is never recommended.", ""]
    if unmatched:
        lines += [f"- {len(unmatched)} export(s) match no compared run and are left out: {', '.join(unmatched)}.", ""]
    return lines


def _pareto_plots(table, comparisons: list[Path], exports: Path, out: Path, run_dirs: Sequence[Path]) -> list[str]:
    """pareto-<dataset>.png per data set: top-1 against latency at the smallest and the largest batch size that
    bench measured (the selection table's own batch size, 1, when it was measured), the Pareto front marked."""
    sizes = latency_batch_sizes(exports)
    if not sizes:
        return []
    panels = {size: table if size == 1 else selection_table(comparisons, exports, None, latency_batch_size=size,
                                                            run_dirs=run_dirs)
              for size in sorted({sizes[0], sizes[-1]})}
    lines = []
    for dataset in sorted({str(d) for d in table["dataset"]}):
        mine = {size: _plot_labels(t[t["dataset"].astype(str) == dataset]) for size, t in panels.items()}
        png = plots.plot_pareto(mine, out / f"pareto-{slug(dataset)}.png", dataset)
        lines += [f"![Test top-1 against latency, {dataset}, Pareto front ringed]({png.name})", ""]
    return lines


def _plot_labels(rows):
    """A model's legend label: arch, method and epochs, and how it was pruned (its precision is the marker); its
    group, the colour when there are many models: the arch, pruned or not."""
    def label(row) -> str:
        pruned = f", {row['pruning']}" if row.get("pruning", "none") != "none" else ""
        return f"{row['arch']} {row['method']} {row['epochs']}ep{pruned}"

    def group(row) -> str:
        return f"{row['arch']}" + (", pruned" if row.get("pruning", "none") != "none" else "")

    records = rows.to_dict("records")
    return rows.assign(label=[label(r) for r in records], group=[group(r) for r in records])


def _row_name(row: dict) -> str:
    pruned = f" pruned ({row['pruning']})" if row.get("pruning", "none") != "none" else ""
    return f"{row['method']} / {row['arch']}{pruned} ({row['precision']})"


def _recommendation_line(pick, budget: str) -> str:
    """The pick of one data set, with whether its lead over the next row is larger than the seed noise; or
    why there is none."""
    if pick.incomplete:
        rows = "; ".join(f"{_row_name(r)} has {r['seeds']} of {r['seeds_compared']} seeds (missing: seed "
                         f"{str(r['missing_seeds']).replace(';', ', ')})" for r in pick.incomplete)
        message = (f"No recommendation{budget} on {pick.dataset}: {rows}; a pick needs every row under the budget "
                   "on every compared seed: export and bench them all (a chain `compare ... export bench report` does)")
        print(f"warning: {message}", file=sys.stderr)
        return f"**{message}.**"
    if pick.pick is None:
        return (f"**No model meets the budget{budget} on {pick.dataset}** (or none has a measured latency: run "
                "`ipasdctl bench`).")
    row = pick.pick
    line = (f"**Best{budget} on {pick.dataset}:** {_row_name(row)}: top-1 {format_cell(row['top1'])} % over "
            f"{row['seeds']} seed(s), {format_cell(row['latency_ms'])} ms. ")
    if pick.runner_up is None:
        return line + "It is the only model under the budget."
    lead, runner_up = pick.lead, _row_name(pick.runner_up)
    other = f"{runner_up} ({format_cell(pick.runner_up['top1'])} %)"
    if lead["pairs"] == 0:
        return line + f"Its lead over {other} cannot be tested: the two share no seed."
    said = f"Its lead over {other}, {lead['mean']:+.2f} points paired over {lead['pairs']} seed(s)"
    if lead["verdict"] == NEEDS_MORE_SEEDS:
        return line + (f"{said}, cannot be told from the seed-to-seed noise: the paired t-test needs {MIN_SEEDS} "
                       "seeds (compare --seeds 0,1,2).")
    test = f"95 % CI [{lead['low']:+.2f}, {lead['high']:+.2f}], p = {lead['p']:.3g}"
    if lead["verdict"] == "better":
        return line + f"{said}, is larger than the seed-to-seed noise ({test})."
    return line + (f"{said}, is not larger than the seed-to-seed noise ({test}): {runner_up} is as good a choice "
                   "on this evidence.")


def check_budget(max_latency_ms: Optional[float]) -> None:
    """--max-latency-ms, if given, is a positive number of milliseconds (checked before a chain trains too)."""
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UserError(f"--max-latency-ms must be positive, got {max_latency_ms}")


def build_report(dirs: Sequence[Path], out: Optional[Path] = None, exports: Optional[Path] = None,
                 max_latency_ms: Optional[float] = None, data_root: Optional[Path] = None, device: str = "auto",
                 tsne_points: Optional[int] = None, progress: bool = False, with_tsne: bool = True) -> Path:
    """Write report.md and its images into `out` (default: the first folder); returns report.md's path.
    `with_tsne=False`: no t-SNE panel, and runs evaluated on the way skip their t-SNE (the slow part of an eval)."""
    if not dirs:
        raise UserError("report needs at least one run folder or comparison folder")
    for directory in dirs:
        if not Path(directory).is_dir():
            raise UserError(f"{directory} does not exist or is not a folder; pass run folders or comparison folders")
    if exports is not None and not Path(exports).is_dir():
        raise UserError(f"--exports {exports} is not a folder; export models first (ipasdctl export) or drop --exports")
    check_budget(max_latency_ms)
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
    to_evaluate = [run for run in runs if run.eval is None and RunFolder(run.run_dir).best.is_file()]
    for done, run in enumerate(to_evaluate, start=1):  # [i/n]: how many of the runs without a fresh eval.json
        print(f"[{done}/{len(to_evaluate)}] evaluating {run.run_dir} ...", file=sys.stderr)
        try:
            points = (tsne_points or evaluation.TSNE_POINTS) if with_tsne else 0
            run.eval = evaluation.eval_run(run.run_dir, "best", data_root, device, tsne_points=points,
                                           progress=progress)
        except UserError as exc:
            skipped.append(f"{run.run_dir}: {exc}")
            print(f"warning: eval of {run.run_dir} skipped: {exc}", file=sys.stderr)

    groups = group_runs(runs)

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# ipasdctl report", "", f"Generated {now} from: " + ", ".join(f"`{d}`" for d in dirs) + ".", ""]
    all_records = []
    for (dataset, arch, epochs), by_method in groups.items():
        by_method = ranked(by_method)
        title = f"{dataset}, {arch}, {epochs} epochs"
        name = slug(dataset, arch, f"{epochs}ep")
        lines += [f"## {title}", ""]
        header, rows, records = summary_rows(by_method)
        all_records += records
        used = sorted({r.eval.get("checkpoint", "best") for rs in by_method.values() for r in rs if r.eval})
        checkpoints = f"{used[0]} checkpoint" if len(used) == 1 else f"checkpoints: {', '.join(used)}"
        lines += ["Mean ± std over seeds, ranked by last-epoch top-1 (as summary.md). Top-1 from training (best "
                  f"epoch / last epoch); 95 % CI: {ACCURACY_CI_NOTE}; eval columns from eval.json "
                  f"({checkpoints}; ECE: 15 equal-width bins; compactness on L2-normalised embeddings, "
                  "intra/inter = mean same-class / mean different-class pair distance, lower is tighter).", "",
                  markdown_table(header, rows), ""]

        curves = {m: [r.metrics for r in rs if r.metrics is not None and len(r.metrics)] for m, rs in by_method.items()}
        curves = {m: frames for m, frames in curves.items() if frames}
        if curves:
            curve_png = plots.plot_training_curves(curves, out / f"curves-{name}.png", title)
            lines += ["### Test top-1 by epoch", "", f"![Test top-1 by epoch, {title}]({curve_png.name})", ""]
            with_terms = {m: frames for m, frames in curves.items() if any(plots.loss_columns(f) for f in frames)}
            if with_terms:
                loss_png = plots.plot_loss_terms(with_terms, out / f"loss_terms-{name}.png", title)
                lines += ["### Loss terms", "", f"![Training loss terms per method, {title}]({loss_png.name})", ""]

        reliability, tsne, class_names = {}, {}, None
        for method, method_runs in by_method.items():
            evaluated = [r for r in method_runs if r.eval]
            if not evaluated:
                continue
            reliability[method] = (pool_reliability_bins([r.eval["reliability"] for r in evaluated]),
                                   [r.eval["ece"] for r in evaluated])
            first = min(evaluated, key=lambda r: seed_key(r.row.get("seed")))
            tsne_path = first.run_dir / "embedding_tsne.csv"
            if with_tsne and tsne_path.is_file():
                coords, labels = evaluation.read_tsne_csv(tsne_path)
                tsne[method] = (coords, labels, first.row.get("seed"))
            if class_names is None and (first.run_dir / "per_class.csv").is_file():
                import pandas as pd

                class_names = [str(c) for c in pd.read_csv(first.run_dir / "per_class.csv")["class_name"]]
        if reliability:
            lines += [f"### Calibration and embeddings ({checkpoints})", ""]
            rel_png = plots.plot_eval_reliability(reliability, out / f"eval_reliability-{name}.png", title)
            lines += [f"![Reliability per method, {title}]({rel_png.name})", ""]
        if tsne:
            if class_names is None:
                class_names = [str(c) for c in range(int(max(t[1].max() for t in tsne.values())) + 1)]
            tsne_png = plots.plot_eval_tsne(tsne, class_names, out / f"eval_tsne-{name}.png", title)
            lines += [f"![t-SNE of test embeddings per method, {title}]({tsne_png.name})", ""]

    if all_records:
        import pandas as pd

        atomic_write_text(out / "report_runs.csv", csv_text(pd.DataFrame(all_records)))
        lines += ["Every run, with its eval metrics: report_runs.csv.", ""]
    for comparison in comparisons:
        if (own_summary := ComparisonFolder(comparison).summary_markdown).is_file():
            lines += [f"The comparison's own summary (reference method, parameters): `{own_summary}`.", ""]
    if exports is not None:
        alone = [run.run_dir for run in runs if run.source == run.run_dir]  # not through a comparison
        lines += selection_section(comparisons, Path(exports), max_latency_ms, out, alone)
    if skipped:
        lines += ["## Not evaluated", ""] + [f"- {s}" for s in skipped] + [""]
    report_path = out / "report.md"
    atomic_write_text(report_path, "\n".join(lines))
    return report_path
