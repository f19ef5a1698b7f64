"""Model selection: accuracy (mean over seeds) against size, compute and measured latency, with the Pareto set.

`selection_table` joins each comparison's `results.csv` (one row per trained run; a run folder given alone is
one row too) with the exports of those runs (`<name>.json` written by `ipasdctl export`, matched to runs by the
`run_dir` recorded in the json) and their latencies (`latency.csv` written by `ipasdctl bench`). One row per (dataset, method, arch, pruning,
epochs, format) (`pruning`: "none", or how `ipasdctl prune` made the run, "macs 50% magnitude", read from its
config.yaml; the export format being `onnx` (fp32), `onnx-int8` or `onnx-fp16` (deploy/formats/) with its
`precision`), and every row's `top1` has one definition: the test top-1 of the model that would ship, measured
by the runtime it ships in. For an exported precision that is the exported models' own onnxruntime top-1 on
the whole test set, averaged over the seeds that were exported (`seeds` of `seeds_compared`; fp32 and int8 of
the same exports stand on the same seeds; `missing_seeds` names the compared seeds a row lacks, `top1_by_seed`
gives its figure per seed); a group without exports gets one fp32 row with the PyTorch top-1 of the same
checkpoint kind (`accuracy_source` says which). PyTorch's best- and last-epoch top-1 over all compared
seeds stand in their own columns. Latency is the `latency_stat` (p50 by default) of onnxruntime's CPU provider
at `latency_batch_size` (1), averaged over the group's exported models of that format. An INT8 or fp16 row
slower than its group's fp32 row is flagged (`slower_than_fp32`) and never recommended. Exports that match no
compared run are listed in `table.attrs["unmatched_exports"]`. `changes_images` marks a method that trains on
images it changes (mixup pairs, extra distorted views; each run's summary records it): part of its accuracy is
the data's.

Pareto optimality is judged within each data set, on (top-1 up, latency down): a row is Pareto-optimal when
no other row has top-1 >= its top-1 and latency <= its latency with at least one of the two strict. Rows
without a measured latency are not judged (pareto_optimal is False).

`recommend` picks, per data set, the most accurate row under a latency budget, but only among rows that stand
on every compared seed: while a row under the budget lacks seeds, its mean is not comparable with the others'
and no pick is made (the rows and their missing seeds are named instead). A pick says whether its lead over
the next row is larger than the seed-to-seed noise: the paired t-test of statistics.py over the seeds both
rows have (per-seed figures: `top1_by_seed`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..deploy.bench import read_latency_csv
from ..deploy.formats import format_name
from ..errors import UserError
from ..runs import ComparisonFolder, RunFolder
from ..safe_io import atomic_write_text, csv_text
from .statistics import paired_test
from .tables import seed_key

GROUP_KEYS = ["dataset", "method", "arch", "pruning", "epochs"]
REQUIRED_RESULT_COLUMNS = {"method", "seed", "arch", "dataset", "best_top1", "run_dir"}
COLUMNS = ["dataset", "method", "changes_images", "arch", "pruning", "epochs", "format", "precision", "checkpoint", "seeds",
           "seeds_compared",
           "missing_seeds", "top1", "top1_std", "top1_by_seed", "top5", "accuracy_source", "pytorch_best_top1",
           "pytorch_last_top1", "params", "macs",
           "file_size_mb", "latency_ms", "latency_p90_ms", "latency_p99_ms", "throughput_ips", "latency_batch_size",
           "threads", "cpu_model", "slower_than_fp32", "exports", "comparisons", "pareto_optimal"]


def _key(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


def _run_key(run_dir: str, comparison_dir: Path) -> str:
    """A run_dir from results.csv as an absolute path: as written when absolute, else relative to the
    comparison folder, the working folder or the comparison's parent (the first that exists)."""
    path = Path(str(run_dir)).expanduser()
    if path.is_absolute():
        return _key(path)
    for base in (comparison_dir, Path.cwd(), comparison_dir.parent):
        if (base / path).exists():
            return _key(base / path)
    return _key(comparison_dir / path)


def load_results(comparison_dirs: Sequence[Path], run_dirs: Sequence[Path] = ()) -> pd.DataFrame:
    """All comparisons' results.csv rows and one row per run folder given alone (its summary), with `comparison`
    (the comparison's name, or the run's) and the resolved `run_key` added."""
    frames = []
    for folder in comparison_dirs:
        folder = Path(folder)
        csv_path = ComparisonFolder(folder).results
        if not csv_path.is_file():
            raise UserError(f"{folder} has no {csv_path.name}; give folders written by `ipasdctl compare`")
        try:
            table = pd.read_csv(csv_path)
        except Exception as exc:  # ParserError, EmptyDataError, UnicodeDecodeError
            raise UserError(f"{csv_path} is not a readable CSV table ({type(exc).__name__}); rerun the comparison") from None
        missing = REQUIRED_RESULT_COLUMNS - set(table.columns)
        if missing:
            raise UserError(f"{csv_path} lacks the columns {', '.join(sorted(missing))}; rerun the comparison")
        table = table.copy() if "status" not in table.columns else table[table["status"] == "finished"].copy()
        if "epochs" not in table.columns:
            table["epochs"] = np.nan
        table["comparison"] = folder.name
        table["run_key"] = [_run_key(r, folder) for r in table["run_dir"]]
        frames.append(table)
    runs = [{**RunFolder(run).result_row(), "comparison": Path(run).name, "run_key": _key(run)} for run in run_dirs]
    if runs:
        frames.append(pd.DataFrame(runs))
    if not frames:
        raise UserError("no comparison or run folders given; name at least one folder written by `ipasdctl "
                        "compare` or `ipasdctl train`")
    table = pd.concat(frames, ignore_index=True).drop_duplicates("run_key", keep="first")
    table["pruning"] = [RunFolder(Path(key)).pruning_label() for key in table["run_key"]]  # "none" unpruned
    return table


def _visible(paths, root: Path) -> list[Path]:
    """Leave out hidden files and folders (an export in progress stages its files in a hidden folder)."""
    return [p for p in sorted(paths) if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def load_exports(exports_dir: Path) -> pd.DataFrame:
    """One row per export json under `exports_dir` (recursively): run_key, precision, file, size, top-1."""
    exports_dir = Path(exports_dir)
    if not exports_dir.is_dir():
        raise UserError(f"exports folder {exports_dir} does not exist; export models with `ipasdctl export` first")
    rows = []
    for json_path in _visible(exports_dir.rglob("*.json"), exports_dir):
        try:
            record = json.loads(json_path.read_text())
        except (OSError, ValueError):
            continue  # not ours
        if not isinstance(record, dict) or not _text(record.get("run_dir")) or not _text(record.get("onnx_file")):
            continue  # not an export record (or one whose fields have other types: not ours either)
        onnx_path = json_path.parent / record["onnx_file"]
        onnx_test = record.get("onnx_test") if isinstance(record.get("onnx_test"), dict) else {}
        size = _number(record.get("file_size_bytes"))
        rows.append({
            "run_key": _key(Path(record["run_dir"])),
            "precision": record.get("precision") if _text(record.get("precision")) else "fp32",
            "format": format_name(record),
            "export": record["onnx_file"],
            "model_key": _key(onnx_path),
            "file_size_bytes": size if not math.isnan(size) or not onnx_path.is_file() else onnx_path.stat().st_size,
            "checkpoint": record.get("checkpoint") if _text(record.get("checkpoint")) else "best",
            "export_top1": _number(onnx_test.get("top1")),  # the model's own onnxruntime top-1, nothing else
            "export_top5": _number(onnx_test.get("top5")),
        })
    return pd.DataFrame(rows, columns=EXPORT_COLUMNS)


def _text(value) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


def _number(value) -> float:
    """A JSON number as a float; anything else (a string, a list, null) is NaN: missing, not a crash."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300:
        return float(value)
    return float("nan")


def _latency_tables(exports_dir: Path, backend: str, provider: str):
    """(path, rows of this backend and provider) of every latency.csv `ipasdctl bench` wrote under exports_dir."""
    for csv_path in _visible(Path(exports_dir).rglob("latency.csv"), Path(exports_dir)):
        table = read_latency_csv(csv_path)
        yield csv_path, table[(table["backend"] == backend) & (table["provider"] == provider)]


def load_latencies(exports_dir: Path, latency_batch_size: int = 1, backend: str = "onnxruntime",
                   provider: str = "CPUExecutionProvider", latency_stat: str = "p50_ms") -> pd.DataFrame:
    """The latency of each benchmarked model (model_key) at one batch size, backend and provider."""
    frames = []
    for csv_path, table in _latency_tables(exports_dir, backend, provider):
        if latency_stat not in table.columns:
            raise UserError(f"{csv_path} has no column '{latency_stat}'")
        table = table[table["batch_size"] == latency_batch_size].copy()
        beside = [csv_path.parent / str(m) for m in table["model"]]
        recorded = table["model_path"] if "model_path" in table.columns else [None] * len(table)
        table["model_key"] = [_key(b) if b.exists() or r is None or (isinstance(r, float) and math.isnan(r))
                              else _key(Path(r)) for b, r in zip(beside, recorded)]
        frames.append(table)
    columns = ["model_key", "latency_ms", "latency_p90_ms", "latency_p99_ms", "throughput_ips", "threads", "cpu_model"]
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)
    if "created" in table.columns:
        table = table.sort_values("created", kind="stable")
    table = table.drop_duplicates("model_key", keep="last")  # the newest measurement of each model
    table = table.rename(columns={latency_stat: "latency_ms", "p90_ms": "latency_p90_ms", "p99_ms": "latency_p99_ms"})
    for column in columns:
        if column not in table.columns:
            table[column] = np.nan
    return table[columns]


def latency_batch_sizes(exports_dir: Path, backend: str = "onnxruntime",
                        provider: str = "CPUExecutionProvider") -> list[int]:
    """The batch sizes `ipasdctl bench` measured in exports_dir for this backend and provider, ascending."""
    sizes: set[int] = set()
    for _, table in _latency_tables(exports_dir, backend, provider):
        sizes.update(int(b) for b in pd.to_numeric(table["batch_size"], errors="coerce").dropna())
    return sorted(sizes)


EXPORT_COLUMNS = ["run_key", "format", "precision", "export", "model_key", "file_size_bytes", "checkpoint",
                  "export_top1", "export_top5"]


def pareto_mask(accuracy: Sequence[float], latency: Sequence[float]) -> np.ndarray:
    """True where no other point is at least as accurate and at least as fast with one of the two strict.

    Points with a missing (NaN) accuracy or latency are never optimal and dominate nothing.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    lat = np.asarray(latency, dtype=np.float64)
    valid = np.isfinite(acc) & np.isfinite(lat)
    mask = np.zeros(acc.shape[0], dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        dominated = others & (acc >= acc[i]) & (lat <= lat[i]) & ((acc > acc[i]) | (lat < lat[i]))
        mask[i] = not dominated.any()
    return mask


def _join_unique(values) -> str:
    seen = [str(v) for v in dict.fromkeys(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))]
    return ";".join(seen)


def selection_table(comparison_dirs: list[Path], exports_dir: Path | None, max_latency_ms: float | None, *,
                    latency_batch_size: int = 1, backend: str = "onnxruntime", provider: str = "CPUExecutionProvider",
                    latency_stat: str = "p50_ms", run_dirs: Sequence[Path] = ()) -> pd.DataFrame:
    """Accuracy vs params, MACs, file size and latency per (dataset, method, arch, epochs, format), with
    `pareto_optimal` (per data set) and, when a budget is given, `within_budget` (latency <= max_latency_ms).
    `run_dirs`: run folders given alone (not through a comparison), one seed each."""
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UserError(f"the latency budget must be a positive number of milliseconds, got {max_latency_ms}")
    results = load_results(comparison_dirs, run_dirs)
    if exports_dir is not None:
        exports = load_exports(exports_dir)
        latencies = load_latencies(exports_dir, latency_batch_size, backend, provider, latency_stat)
        exports = exports.merge(latencies, on="model_key", how="left")
    else:
        exports = pd.DataFrame(columns=EXPORT_COLUMNS + ["latency_ms"])

    rows = []
    for key, group in results.groupby(GROUP_KEYS, dropna=False, sort=True):
        matched = exports[exports["run_key"].isin(set(group["run_key"]))]
        seed_of = {run_key: _seed_text(seed) for run_key, seed in zip(group["run_key"], group["seed"])}
        matched = matched.assign(seed=matched["run_key"].map(seed_of))
        compared = sorted(set(seed_of.values()), key=seed_key)
        shared = {
            **dict(zip(GROUP_KEYS, key)),
            "seeds_compared": len(compared),
            "changes_images": _changes_images(group),
            "pytorch_best_top1": group["best_top1"].mean(),
            "pytorch_last_top1": group["last_top1"].mean() if "last_top1" in group else np.nan,
            "params": group["params"].mean() if "params" in group else np.nan,
            "macs": group["macs"].mean() if "macs" in group else np.nan,
            "comparisons": _join_unique(group["comparison"]),
        }
        if matched.empty:
            row = _pytorch_row(group, _common(exports["checkpoint"], "best"))
            per_seed = _seed_columns(group["seed"].map(_seed_text), row.pop("_top1"), compared)
            rows.append({**shared, **row, **per_seed})
            continue
        for fmt in sorted(set(matched["format"]), key=lambda f: (f != "onnx", f)):  # fp32 first
            mine = matched[matched["format"] == fmt]
            row = _exported_row(mine, fmt, latency_batch_size)
            per_seed = _seed_columns(mine["seed"], row.pop("_top1"), compared)
            rows.append({**shared, **row, **per_seed})
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "pareto_optimal"])
    table["slower_than_fp32"] = _slower_than_fp32(table)
    unmatched = sorted(exports.loc[~exports["run_key"].isin(set(results["run_key"])), "export"])
    table["pareto_optimal"] = False
    for _dataset, index in table.groupby("dataset", dropna=False).groups.items():
        part = table.loc[index]
        table.loc[index, "pareto_optimal"] = pareto_mask(part["top1"], part["latency_ms"])
    if max_latency_ms is not None:
        table["within_budget"] = pd.to_numeric(table["latency_ms"], errors="coerce") <= max_latency_ms
    table = table.sort_values(["dataset", "top1", "latency_ms"], ascending=[True, False, True], kind="stable")
    table = table.reset_index(drop=True)
    table.attrs["unmatched_exports"] = unmatched
    return table


def _changes_images(group: pd.DataFrame) -> bool:
    """Whether the group's runs trained on images their method changes (recorded by the run; absent: no)."""
    if "changes_images" not in group.columns:
        return False
    return bool(group["changes_images"].map(lambda value: value is True or str(value) == "True").any())


def _common(values, default: str) -> str:
    """The one value of a column (e.g. every export's checkpoint kind), else `default`."""
    values = set(v for v in values if isinstance(v, str))
    return values.pop() if len(values) == 1 else default


def _pytorch_row(group: pd.DataFrame, checkpoint: str) -> dict:
    """A group without exports: fp32, the PyTorch top-1 of the checkpoint kind the exports use, every seed."""
    column = "best_top1" if checkpoint == "best" else "last_top1"
    top1 = pd.to_numeric(group[column], errors="coerce")
    return {"format": "", "precision": "fp32", "checkpoint": checkpoint, "_top1": top1,
            "top5": group["best_top5"].mean() if checkpoint == "best" and "best_top5" in group else np.nan,
            "accuracy_source": f"pytorch, {checkpoint} epoch, not exported", "slower_than_fp32": False,
            "file_size_mb": np.nan, "latency_ms": np.nan, "latency_p90_ms": np.nan, "latency_p99_ms": np.nan,
            "throughput_ips": np.nan, "latency_batch_size": np.nan, "threads": "", "cpu_model": "", "exports": ""}


def _exported_row(mine: pd.DataFrame, fmt: str, latency_batch_size: int) -> dict:
    """One format of a group: the exported models' own onnxruntime top-1 and latency, over their seeds."""
    precision = _common(mine["precision"], "mixed")
    checkpoint = _common(mine["checkpoint"], "mixed")
    latency = pd.to_numeric(mine["latency_ms"], errors="coerce")
    return {"format": fmt, "precision": precision, "checkpoint": checkpoint,
            "_top1": pd.to_numeric(mine["export_top1"], errors="coerce"),
            "top5": pd.to_numeric(mine["export_top5"], errors="coerce").mean(),
            "accuracy_source": f"onnxruntime {precision}, {checkpoint} checkpoint, test set",
            "file_size_mb": pd.to_numeric(mine["file_size_bytes"], errors="coerce").mean() / 1e6,
            "latency_ms": latency.mean(),
            "latency_p90_ms": pd.to_numeric(mine.get("latency_p90_ms"), errors="coerce").mean(),
            "latency_p99_ms": pd.to_numeric(mine.get("latency_p99_ms"), errors="coerce").mean(),
            "throughput_ips": pd.to_numeric(mine.get("throughput_ips"), errors="coerce").mean(),
            "latency_batch_size": latency_batch_size if latency.notna().any() else np.nan,
            "threads": _join_unique(mine["threads"]), "cpu_model": _join_unique(mine["cpu_model"]),
            "exports": _join_unique(mine["export"])}


def _seed_text(seed) -> str:
    """A seed as results.csv and summaries write it: 0, not 0.0."""
    try:
        return str(int(seed)) if float(seed).is_integer() else str(seed)
    except (TypeError, ValueError):
        return str(seed)


def _seed_columns(seeds: pd.Series, top1: pd.Series, compared: list[str]) -> dict:
    """seeds, top1 (mean of the per-seed figures), its sample std, top1_by_seed and missing_seeds of one row."""
    per_seed = pd.Series(top1.to_numpy(), index=seeds.to_numpy()).dropna()
    per_seed = per_seed.groupby(level=0).mean()  # a seed exported twice counts once
    ordered = sorted(per_seed.index, key=seed_key)
    return {"seeds": len(ordered), "top1": per_seed.mean() if ordered else np.nan,
            "top1_std": per_seed.std(ddof=1) if len(ordered) > 1 else np.nan,
            "top1_by_seed": ";".join(f"{s}:{per_seed[s]:.10g}" for s in ordered),
            "missing_seeds": ";".join(s for s in compared if s not in per_seed.index)}


def top1_by_seed(row) -> dict[str, float]:
    """A selection row's `top1_by_seed` ("0:75.1;1:77.3") as {seed: top-1}."""
    text = row.get("top1_by_seed") if hasattr(row, "get") else None
    if not isinstance(text, str) or not text:
        return {}
    pairs = (part.rsplit(":", 1) for part in text.split(";") if ":" in part)
    return {seed: float(value) for seed, value in pairs}


def _slower_than_fp32(table: pd.DataFrame) -> pd.Series:
    """True for a non-fp32 row whose latency is above its group's fp32 row's (both measured)."""
    fp32 = table[table["precision"] == "fp32"].set_index(GROUP_KEYS)["latency_ms"]
    slower = []
    for row in table.itertuples(index=False):
        key = tuple(getattr(row, k) for k in GROUP_KEYS)
        reference = fp32.get(key, np.nan) if row.precision != "fp32" else np.nan
        reference = reference.iloc[0] if isinstance(reference, pd.Series) else reference
        slower.append(bool(pd.notna(row.latency_ms) and pd.notna(reference) and row.latency_ms > reference))
    return pd.Series(slower, index=table.index, dtype=bool)


@dataclass
class Recommendation:
    """The pick of one data set under a latency budget, or why there is none."""

    dataset: str
    pick: Optional[dict] = None  # the most accurate complete row under the budget (None: see incomplete)
    incomplete: list[dict] = field(default_factory=list)  # rows under the budget lacking compared seeds
    runner_up: Optional[dict] = None  # the next row under the budget
    lead: Optional[dict] = None  # statistics.paired_test of pick against runner_up over the seeds both have


def incomplete_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with fewer seeds than were compared (`missing_seeds` names them)."""
    if "missing_seeds" not in df.columns:
        return df.iloc[0:0]
    return df[df["missing_seeds"].fillna("").astype(str) != ""]


def _candidates(df: pd.DataFrame, max_latency_ms: float) -> pd.DataFrame:
    """The rows that may be recommended under the budget, most accurate first (ties: the faster)."""
    if max_latency_ms is None or not max_latency_ms > 0:
        raise UserError(f"the latency budget must be a positive number of milliseconds, got {max_latency_ms}")
    missing = {"dataset", "top1", "latency_ms"} - set(df.columns)
    if missing:
        raise UserError(f"the selection table lacks {', '.join(sorted(missing))}; build it with selection_table")
    latency = pd.to_numeric(df["latency_ms"], errors="coerce")
    slower = df["slower_than_fp32"].astype(bool) if "slower_than_fp32" in df else False
    fits = df[(latency <= max_latency_ms) & df["top1"].notna() & ~slower]
    return fits.assign(_lat=latency[fits.index]).sort_values(["dataset", "top1", "_lat"], ascending=[True, False, True],
                                                             kind="stable").drop(columns="_lat")


def recommend(df: pd.DataFrame, max_latency_ms: float) -> list[Recommendation]:
    """Per data set of the table: the pick under the budget with its lead over the next row, no pick while a
    row under the budget lacks compared seeds, or nothing when no row fits."""
    fits = _candidates(df, max_latency_ms)
    out = []
    for dataset in sorted(set(df["dataset"]), key=str):
        mine = fits[fits["dataset"] == dataset]
        gaps = incomplete_rows(mine)
        if not gaps.empty:
            out.append(Recommendation(dataset, incomplete=gaps.to_dict("records")))
            continue
        if mine.empty:
            out.append(Recommendation(dataset))
            continue
        ranked = mine.to_dict("records")
        pick, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        lead = None
        if runner_up is not None:
            mine_by_seed, theirs = top1_by_seed(pick), top1_by_seed(runner_up)
            shared = sorted(set(mine_by_seed) & set(theirs), key=seed_key)
            lead = paired_test([mine_by_seed[s] for s in shared], [theirs[s] for s in shared])
        out.append(Recommendation(dataset, pick, runner_up=runner_up, lead=lead))
    return out


def best_under_budget(df: pd.DataFrame, max_latency_ms: float) -> pd.DataFrame:
    """Per data set, the most accurate row whose latency is at most `max_latency_ms` (ties: the faster one),
    among rows on every compared seed; no row for a data set where a row under the budget lacks seeds.

    Rows without a measured latency never qualify. An empty frame when nothing fits the budget.
    """
    picks = [r.pick for r in recommend(df, max_latency_ms) if r.pick is not None]
    return pd.DataFrame(picks, columns=list(df.columns)).reset_index(drop=True)


def write_selection(df: pd.DataFrame, path: Path) -> Path:
    """selection.csv, written atomically."""
    path = Path(path)
    atomic_write_text(path, csv_text(df))
    return path
