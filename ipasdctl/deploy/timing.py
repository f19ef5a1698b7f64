"""Timing shared by `export` (its quick speed checks) and `bench` (its latency tables), and the latency table's
file: how a call is timed, how two models are timed against each other, and which rows of latency.csv an
export that replaced a model's bytes makes stale.

A call is timed on its own (`time.perf_counter_ns` around it), after untimed warm-up calls. Two models are
compared by their p50 over the same number of calls, taken in blocks that alternate between them, so a drift
of a busy machine hits both alike (`paired_p50`); a derived model (INT8, fp16) "pays" when its p50 is below
its fp32 original's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import runtime
from ..errors import UserError
from ..safe_io import atomic_write_text, csv_text
from .onnx_files import ort_session

LATENCY_CSV = "latency.csv"


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Latency of each of `runs` calls in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter_ns()
        call()
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return times


def paired_p50(calls: dict[str, Callable[[], object]], runs: int, warmup: int, rounds: int = 2) -> dict[str, float]:
    """p50 (ms) of each call over `runs` timed calls, taken in `rounds` blocks that alternate between the calls
    (each block after `warmup` untimed calls), so a drift of the machine hits every call alike."""
    per_block = max(1, runs // rounds)
    times: dict[str, list] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(time_calls(call, per_block, warmup))
    return {name: float(np.percentile(np.concatenate(blocks), 50)) for name, blocks in times.items()}


def speed_verdict(fp32_p50_ms: float, p50_ms: float) -> dict:
    """A derived model pays when its p50 is below its fp32 original's; `speedup_vs_fp32` = fp32 p50 / its p50."""
    ratio = fp32_p50_ms / p50_ms if p50_ms > 0 else float("nan")
    return {"fp32_p50_ms": fp32_p50_ms, "p50_ms": p50_ms, "speedup_vs_fp32": ratio, "pays": bool(ratio > 1.0)}


def int8_verdict(fp32_p50_ms: float, int8_p50_ms: float) -> dict:
    """speed_verdict in the names an INT8 record has always had (`int8_vs_fp32`, `int8_pays`)."""
    verdict = speed_verdict(fp32_p50_ms, int8_p50_ms)
    return {"fp32_p50_ms": fp32_p50_ms, "int8_p50_ms": int8_p50_ms, "int8_vs_fp32": verdict["speedup_vs_fp32"],
            "int8_pays": verdict["pays"]}


def quick_p50s(fp32_path: Path, derived_path: Path, x: np.ndarray, label: str, threads: Optional[int] = None,
               runs: int = 40, warmup: int = 5) -> tuple[dict[str, float], dict]:
    """({"fp32": p50, label: p50}, how it was measured): both models on `x` with onnxruntime's CPU provider,
    `runs` calls each in 2 alternating blocks (see paired_p50). Quick, for export's verdict; bench measures longer."""
    import torch

    threads = int(threads or torch.get_num_threads())
    calls = {}
    for name, path in (("fp32", fp32_path), (label, derived_path)):
        session = ort_session(path, threads)
        calls[name] = lambda session=session: session.run(None, {session.get_inputs()[0].name: x})
    how = {"batch_size": int(x.shape[0]), "runs": runs, "warmup": warmup, "threads": threads,
           "cpu_model": runtime.cpu_model(),
           "measured": f"onnxruntime CPU provider on test images, p50 of {runs} calls per model in 2 blocks "
                       f"alternating fp32/{label}, each after {warmup} untimed calls, during export on this machine "
                       "(other load on it shows in the figures); `ipasdctl bench` measures longer"}
    return paired_p50(calls, runs, warmup), how


def int8_speed_check(fp32_path: Path, int8_path: Path, x: np.ndarray, threads: Optional[int] = None,
                     runs: int = 40, warmup: int = 5) -> dict:
    """A quick p50 of the fp32 and the INT8 model on `x` (quick_p50s), and the verdict."""
    p50, how = quick_p50s(fp32_path, int8_path, x, "int8", threads, runs, warmup)
    return {**int8_verdict(p50["fp32"], p50["int8"]), **how}


def read_latency_csv(path: Path):
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except Exception as exc:  # pandas raises ParserError, EmptyDataError, UnicodeDecodeError...
        raise UserError(f"{path} is not a latency table written by `ipasdctl bench` ({type(exc).__name__}); "
                        "move it away or choose another --out") from None
    missing = {"model", "backend", "provider", "batch_size", "p50_ms"} - set(table.columns)
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(sorted(missing))}; it was not written by "
                        "`ipasdctl bench`: move it away or choose another --out")
    return table


def forget_latencies(csv_path: Path, models: Sequence[Path]) -> None:
    """Drop the rows of `models` (files an export has replaced) from latency.csv: they timed other bytes."""
    if not models or not Path(csv_path).is_file():
        return
    try:
        table = read_latency_csv(csv_path)
    except UserError:
        return  # not a table of ours: left as it is
    names = {Path(m).name for m in models}
    paths = {str(Path(m).resolve()) for m in models}
    replaced = table["model"].astype(str).isin(names)
    if "model_path" in table.columns:
        replaced |= table["model_path"].astype(str).isin(paths)
    if replaced.any():
        atomic_write_text(csv_path, csv_text(table[~replaced]))
