"""Inference latency of an exported model: onnxruntime (CPU provider; CUDA too when present, or the one
`provider` names) and PyTorch eager.

For every backend and batch size: `warmup` untimed calls, then `runs` calls each timed on its own
(`time.perf_counter_ns` around one call; CUDA synchronised inside the call), summarised as p50 / p90 / p99 /
mean latency in milliseconds and throughput = batch size / median latency (images per second: the median, as
the mean follows the few slow calls a busy machine makes; p99 above UNSTABLE_TAIL x p50 is reported as an
unstable measurement by `unstable_rows`). A call goes from
host memory to host memory on every backend (numpy in, numpy out for onnxruntime; a CPU tensor in and out
for PyTorch, with the copies included on CUDA), so the backends are timed alike. The thread count (the same
for both backends), the CPU model and the library versions go into every row of `latency.csv`. The model runs
in its format's session (deploy/formats/: its execution providers and input dtype).

`provider` (`bench --provider`): cpu, cuda or tensorrt alone, for onnxruntime and PyTorch alike (cuda and
tensorrt: PyTorch on CUDA); cuda and tensorrt need the onnxruntime-gpu package, and without it are one line.

A model made from an fp32 file (INT8, fp16) is timed against that original too (the file its json names, when
it is beside it): the fp32 model is timed right after it on the same provider, at each batch size with the
same settings, and its rows carry `fp32_p50_ms` (the fp32 model's p50 they were compared with),
`speedup_vs_fp32` (fp32 p50 / its p50, above 1 when it is faster) and `faster_than_fp32`; INT8 rows also in
the names they have always had, `int8_vs_fp32` and `int8_pays`. `slower_line` says in one line when such a
model is slower than fp32 on the CPU and its format says why (fp16: onnxruntime's CPU provider runs few
operators in float16).

PyTorch eager rows time the run's checkpoint, whatever the exported model's precision: they are named after it
(`model` = `<run>/checkpoints/<best|last>.pt`, precision fp32, `model_sha256` the checkpoint's), and one bench
call of several models of one run (a chain's fp32 and INT8 exports) times it once (`torch_timed`). A rerun that
may keep earlier rows (`skip_measured`) measures again when any of them was flagged unstable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import runtime
from ..bounds import MAX_IMAGE_SIDE
from ..errors import UserError
from ..runs import RunFolder, load_model, read_json
from ..safe_io import atomic_write_text, csv_text, sha256_of
from .formats import format_of, model_session
from .onnx_files import PROVIDERS, check_onnx_file, check_provider, metadata_of, read_metadata
from .timing import LATENCY_CSV, forget_latencies, int8_verdict, read_latency_csv, speed_verdict, time_calls

__all__ = ["LATENCY_CSV", "bench", "check_bench_options", "expand_models", "forget_latencies", "format_table", "int8_verdict",
           "read_latency_csv", "slower_line", "summarize", "unstable_rows"]

PERCENTILES = (50, 90, 99)
UNSTABLE_TAIL = 5.0  # p99 / p50 above this: other load disturbed the timing
MAX_RUNS = 100_000  # timed calls per batch size: at 1 ms a call, about 2 minutes
ACTIVATION_FACTOR = 32  # bytes a network holds while it runs, per byte of its input (a generous estimate)
COLUMNS = ["model", "precision", "backend", "provider", "batch_size", "threads", "runs", "warmup", "p50_ms",
           "p90_ms", "p99_ms", "mean_ms", "min_ms", "throughput_ips", "cpu_model", "accelerator", "onnxruntime",
           "torch", "created", "model_path", "model_sha256", "fp32_p50_ms", "int8_vs_fp32", "int8_pays",
           "speedup_vs_fp32", "faster_than_fp32"]


def expand_models(paths: Sequence[Path]) -> list[Path]:
    """The models that `bench PATH...` times: each .onnx file as given, and every .onnx file in a folder (not
    its subfolders), by name. A folder without one is a UserError; a file is checked when it is timed."""
    models: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            models.append(path)
            continue
        found = sorted(p for p in path.glob("*.onnx") if p.is_file() and not p.name.startswith("."))
        if not found:
            raise UserError(f"{path} holds no .onnx model; export one first (ipasdctl export RUN --out {path})")
        models += found
    return list(dict.fromkeys(models))  # a model named twice (a folder and one of its files) is timed once


def parse_batch_sizes(text: str | Sequence[int]) -> list[int]:
    """'1,8,64' -> [1, 8, 64]; every size a positive integer."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--batch-sizes must be comma-separated integers (e.g. 1,8,64), got '{text}'") from None
    else:
        sizes = [int(s) for s in text]
    if not sizes or min(sizes) <= 0:
        raise UserError(f"--batch-sizes must be positive integers (e.g. 1,8,64), got '{text}'")
    return list(dict.fromkeys(sizes))


def check_bench_options(batch_sizes, runs: int, threads: Optional[int], warmup: Optional[int],
                        provider: Optional[str] = None) -> list[int]:
    """The batch sizes, once every option is checked (before a chain trains anything)."""
    check_provider(provider)
    sizes = parse_batch_sizes(batch_sizes)
    if not 0 < runs <= MAX_RUNS:
        raise UserError(f"--runs must be from 1 to {MAX_RUNS}, got {runs}")
    runtime.check_thread_count("--threads", threads)
    if warmup is not None and not 0 <= int(warmup) <= MAX_RUNS:
        raise UserError(f"--warmup must be from 0 to {MAX_RUNS}, got {warmup}")
    return sizes


def check_batch_memory(sizes: Sequence[int], shape: Sequence[int]) -> None:
    """The largest batch's input, with the activations a network holds for it (about ACTIVATION_FACTOR x the
    input), must fit in half of this machine's memory: 1,000,000 images would otherwise die in the allocator."""
    image_bytes = 4 * int(np.prod(shape))  # float32
    memory = runtime.memory_bytes()
    largest = max(1, (memory // 2) // (ACTIVATION_FACTOR * image_bytes))
    if max(sizes) > largest:
        shown = "x".join(str(v) for v in shape)
        raise UserError(f"--batch-sizes {max(sizes)} is too large for {shown} images on this machine: a batch may "
                        f"take at most half of its {memory / 2**30:.0f} GiB of memory (input and activations, about "
                        f"{ACTIVATION_FACTOR} x {image_bytes} bytes an image), so at most {largest} images; use "
                        "smaller batch sizes")


def fp32_original(model_path: Path, record: dict) -> Optional[Path]:
    """The fp32 model an INT8 or fp16 export was made from, when its json names it and it lies beside it."""
    name = record.get("fp32_onnx_file") if record.get("precision", "fp32") != "fp32" else None
    path = model_path.parent / name if name else None
    return path if path is not None and path.is_file() else None


def summarize(times_ms: np.ndarray, batch_size: int) -> dict:
    """p50 / p90 / p99 (linear interpolation between order statistics), mean, min, and images per second at the
    median latency."""
    p50, p90, p99 = np.percentile(times_ms, PERCENTILES)
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(times_ms.mean()),
            "min_ms": float(times_ms.min()), "throughput_ips": batch_size * 1000.0 / p50 if p50 > 0 else float("nan")}


def unstable_rows(rows) -> list[str]:
    """One warning per row whose p99 exceeds UNSTABLE_TAIL x its p50 (the machine was busy meanwhile)."""
    warnings = []
    for row in rows.itertuples():
        if row.p50_ms > 0 and row.p99_ms / row.p50_ms > UNSTABLE_TAIL:
            warnings.append(f"warning: {row.backend} {row.provider} batch {row.batch_size}: p99 {row.p99_ms:.3f} ms is "
                            f"{row.p99_ms / row.p50_ms:.0f}x the median {row.p50_ms:.3f} ms, an unstable measurement "
                            "(a busy machine?); rerun with more --runs, or fewer --threads")
    return warnings


def _input_shape(model_path: Path, meta: dict, proto) -> list[int]:
    if meta.get("input_size"):
        return list(meta["input_size"])  # checked by metadata_of
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value for d in dims[1:]]
    if shape and max(shape) > MAX_IMAGE_SIDE:
        raise UserError(f"{model_path} takes inputs of shape {shape}, larger than {MAX_IMAGE_SIDE} pixels a side; "
                        "bench models exported by `ipasdctl export --onnx`")
    if not shape or any(v <= 0 for v in shape):
        raise UserError(f"{model_path} has no fixed image size in its input or metadata; export it with "
                        "`ipasdctl export --onnx`")
    return shape


def bench(model_path: Path, batch_sizes: Sequence[int] = (1, 8, 64), threads: Optional[int] = None,
          runs: int = 200, warmup: Optional[int] = None, torch_run: Optional[Path] = None,
          out: Optional[Path] = None, with_torch: bool = True, log: Optional[Callable[[str], None]] = None,
          skip_measured: bool = False, torch_timed: Optional[set] = None, provider: Optional[str] = None):
    """Time `model_path` (and its PyTorch source) at each batch size; merge the rows into latency.csv.

    `torch_run` is the run folder whose checkpoint PyTorch eager times; without it the run recorded in the
    export's json is used when it still exists (`with_torch=False` skips PyTorch). `torch_timed`: the
    checkpoints timed in PyTorch already by this caller (not timed again; the one timed now is added).
    `provider`: cpu, cuda or tensorrt only (None: the CPU, and CUDA where present). Rows already in the csv for
    the same model are replaced. Returns (DataFrame of the new rows, path of latency.csv).
    """
    import pandas as pd
    import torch

    model_path = Path(model_path)
    proto = check_onnx_file(model_path)
    meta = metadata_of(proto, model_path)
    sizes = check_bench_options(batch_sizes, runs, threads, warmup, provider)
    fmt = format_of(meta, model_path)
    if provider is not None and provider not in fmt.providers:
        raise UserError(f"{model_path.name} is a {fmt.name} model, which runs on --provider "
                        f"{', '.join(fmt.providers)}, not {provider}")
    threads = int(threads) if threads is not None else torch.get_num_threads()
    warmup = max(5, runs // 10) if warmup is None else int(warmup)
    csv_path = _csv_path(model_path, out)
    model_sha256 = sha256_of(model_path)
    record = {k: v for k, v in (read_json(model_path.with_suffix(".json")) or {}).items()
              if isinstance(v, str)}  # the json beside the model: only its strings are read, others ignored
    checkpoint = record.get("checkpoint") or meta.get("checkpoint") or "best"
    torch_checkpoint = _torch_checkpoint(torch_run, record, meta, checkpoint, log) if with_torch else None
    if torch_checkpoint is not None and torch_timed is not None and str(torch_checkpoint) in torch_timed:
        if log:
            log(f"PyTorch eager of {_checkpoint_name(torch_checkpoint)} was timed with a model before this one: "
                "not again")
        torch_checkpoint = None
    torch_sha256 = sha256_of(torch_checkpoint) if torch_checkpoint is not None else None
    if torch_checkpoint is not None and torch_timed is not None:
        torch_timed.add(str(torch_checkpoint))
    if skip_measured:
        kept = _measured_before(csv_path, model_sha256, torch_sha256, sizes, threads, runs, warmup, log,
                                PROVIDERS[provider][0] if provider else None)
        if kept is not None:
            return kept, csv_path
    shape = _input_shape(model_path, meta, proto)
    check_batch_memory(sizes, shape)
    torch_model = None
    if torch_checkpoint is not None:
        torch_model = load_model(torch_checkpoint.parent.parent, torch_checkpoint.stem, device="cpu")[0]

    import onnxruntime as ort

    if provider is None:
        names = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    else:
        names = [provider]
    input_name = proto.graph.input[0].name
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in sizes}
    original = fp32_original(model_path, record)  # a model made from an fp32 file is timed against it
    # (backend, provider, call, the fp32 original's call on the same provider or None)
    backends: list[tuple[str, str, Callable, Optional[Callable]]] = []
    for name in names:
        session = fmt.session(model_path, threads, name)
        used, wanted = session.get_providers()[0], PROVIDERS[name][0]
        if used != wanted:
            if provider is not None:  # asked for by name: falling back to the CPU would time the wrong thing
                raise UserError(f"onnxruntime could not start {wanted} for {model_path.name} (it fell back to "
                                f"{used}): check that the CUDA{' and TensorRT' if name == 'tensorrt' else ''} "
                                "libraries onnxruntime-gpu needs are installed, or use --provider cpu")
            continue
        run_fp32 = None
        if original is not None:
            fp32 = model_session(original, threads, name)
            run_fp32 = lambda x, fp32=fp32: fp32.run(None, {fp32.get_inputs()[0].name: x})  # noqa: E731
        backends.append(("onnxruntime", used, lambda x, session=session: session.run(None, {input_name: x}), run_fp32))
    if torch_model is not None:
        def torch_call(model, device):
            def call(x):
                with torch.inference_mode():
                    out = model(torch.from_numpy(x).to(device, non_blocking=False))
                    return out.cpu() if device.type == "cuda" else out
            return call

        if "cpu" in names:
            backends.append(("pytorch", "cpu", torch_call(torch_model, torch.device("cpu")), None))
        if torch.cuda.is_available() and (provider is None or provider != "cpu"):
            cuda = torch.device("cuda")
            import copy

            backends.append(("pytorch", "cuda", torch_call(copy.deepcopy(torch_model).to(cuda), cuda), None))
        elif provider is not None and provider != "cpu" and log:
            log(f"PyTorch has no CUDA device here: its eager rows are left out of --provider {provider}")

    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    cpu = runtime.cpu_model()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for backend, used, run_one, run_fp32 in backends:
            for b in sizes:
                x = inputs[b]
                if log:
                    log(f"timing {backend} ({used}) at batch {b}: {warmup} warm-up + {runs} timed calls")
                times = time_calls(lambda: run_one(x), runs, warmup)
                row = {"model": model_path.name, "precision": meta.get("precision", record.get("precision", "")),
                       "backend": backend, "provider": used, "batch_size": b, "threads": threads,
                       "runs": runs, "warmup": warmup, **summarize(times, b), "cpu_model": cpu,
                       "accelerator": accelerator if used not in ("cpu", "CPUExecutionProvider") else "",
                       "onnxruntime": ort.__version__, "torch": torch.__version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model_path": str(model_path.resolve()),
                       "model_sha256": model_sha256}
                if backend == "pytorch":  # the run's checkpoint, not the exported file
                    row.update(model=_checkpoint_name(torch_checkpoint), precision="fp32",
                               model_path=str(torch_checkpoint), model_sha256=torch_sha256)
                if run_fp32 is not None:
                    fp32_p50 = summarize(time_calls(lambda: run_fp32(x), runs, warmup), b)["p50_ms"]
                    verdict = speed_verdict(fp32_p50, row["p50_ms"])
                    row.update(fp32_p50_ms=fp32_p50, speedup_vs_fp32=verdict["speedup_vs_fp32"],
                               faster_than_fp32=verdict["pays"])
                    if row["precision"] == "int8":  # the columns INT8 rows have always had
                        row.update(int8_vs_fp32=verdict["speedup_vs_fp32"], int8_pays=verdict["pays"])
                rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    new = pd.DataFrame(rows, columns=COLUMNS)
    merged = _merge(csv_path, new)
    atomic_write_text(csv_path, csv_text(merged))
    return new, csv_path


def _torch_checkpoint(torch_run: Optional[Path], record: dict, meta: dict, checkpoint: str,
                      log: Optional[Callable[[str], None]]) -> Optional[Path]:
    """The checkpoint PyTorch eager times (absolute): of --torch, else of the run recorded beside the model."""
    if torch_run is not None:
        folder = RunFolder(torch_run)
        if not folder.path.exists():
            raise UserError(f"--torch {folder.path} does not exist; pass the run folder the model was exported from, "
                            "or --no-torch")
        if not folder.checkpoint(checkpoint).is_file():
            raise UserError(f"--torch {folder.path} has no checkpoints/{checkpoint}.pt; pass the run folder the "
                            "model was exported from, or --no-torch")
        return folder.checkpoint(checkpoint).resolve()
    recorded = record.get("run_dir") or meta.get("source_run")
    if recorded and RunFolder(recorded).checkpoint(checkpoint).is_file():
        return RunFolder(recorded).checkpoint(checkpoint).resolve()
    if log:
        log("no PyTorch run folder (--torch) and none recorded beside the model: timing onnxruntime only")
    return None


def _checkpoint_name(checkpoint: Path) -> str:
    """`<run>/checkpoints/best.pt`: what a PyTorch row timed."""
    return f"{checkpoint.parent.parent.name}/{checkpoint.parent.name}/{checkpoint.name}"


def _measured_before(csv_path: Path, model_sha256: str, torch_sha256: Optional[str], sizes: Sequence[int],
                     threads: int, runs: int, warmup: int, log: Optional[Callable[[str], None]] = None,
                     ort_provider: Optional[str] = None):
    """The rows of latency.csv that measured these model bytes (and, with `torch_sha256`, the checkpoint's in
    PyTorch) on this CPU with these settings at every batch size asked for (`ort_provider`: on that provider,
    PyTorch on its device), or None: also when one of them was flagged unstable, so that a rerun measures it
    again."""
    import onnxruntime as ort

    if not csv_path.is_file():
        return None
    table = read_latency_csv(csv_path)
    if "model_sha256" not in table.columns:
        return None
    mine = table[table["model_sha256"].isin([model_sha256, torch_sha256]) & (table["cpu_model"] == runtime.cpu_model())
                 & (table["threads"] == threads) & (table["runs"] == runs) & (table["warmup"] == warmup)
                 & (table["onnxruntime"] == ort.__version__) & table["batch_size"].isin(list(sizes))]
    if ort_provider is not None:
        device = "cpu" if ort_provider == "CPUExecutionProvider" else "cuda"
        mine = mine[((mine["backend"] == "onnxruntime") & (mine["provider"] == ort_provider))
                    | ((mine["backend"] == "pytorch") & (mine["provider"] == device))]
    for backend, sha in (("onnxruntime", model_sha256), ("pytorch", torch_sha256)):
        measured = set(mine.loc[(mine["backend"] == backend) & (mine["model_sha256"] == sha), "batch_size"])
        if sha is not None and not set(sizes) <= measured:
            return None
    mine = mine.reset_index(drop=True).reindex(columns=[*COLUMNS, *(c for c in mine.columns if c not in COLUMNS)])
    unstable = unstable_rows(mine)
    if unstable:
        if log:
            log(f"{len(unstable)} latenc{'y' if len(unstable) == 1 else 'ies'} measured before were flagged unstable: "
                "measuring again")
        return None
    mine.attrs["skipped"] = True
    return mine


def _csv_path(model_path: Path, out: Optional[Path]) -> Path:
    """latency.csv beside the model, in the folder --out, or --out itself when it names a .csv file."""
    import os

    if out is None:
        target = model_path.parent / LATENCY_CSV
    else:
        out = Path(out)
        target = out if out.suffix == ".csv" else out / LATENCY_CSV
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {target.parent}: {exc.strerror or exc}; choose a writable --out") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UserError(f"{target.parent} is not writable; choose another --out")
    return target


def _merge(csv_path: Path, new):
    """The existing table without this model's rows, then the new rows."""
    import pandas as pd

    if not csv_path.exists():
        return new
    old = read_latency_csv(csv_path)
    if "model_path" in old.columns:
        old = old[~old["model_path"].astype(str).isin(new["model_path"].astype(str))]
    columns = list(COLUMNS) + [c for c in old.columns if c not in COLUMNS]
    return pd.concat([old, new], ignore_index=True).reindex(columns=columns)


def format_table(rows) -> str:
    """The printed table: one line per backend and batch size; rows of a model timed against its fp32 original
    show that model's p50, the speed-up and '<precision>_pays': 'no' where it is not faster."""
    import pandas as pd

    columns = ["backend", "provider", "precision", "batch_size", "threads", "p50_ms", "p90_ms", "p99_ms",
               "throughput_ips"]
    shown = rows[columns].copy()
    speedup = rows["speedup_vs_fp32"].fillna(rows["int8_vs_fp32"])  # rows measured before the column existed
    faster = rows["faster_than_fp32"].fillna(rows["int8_pays"])
    if faster.notna().any():
        precision = next(p for p, f in zip(rows["precision"], faster) if pd.notna(f))
        shown["fp32_p50_ms"] = [f"{v:.3f}" if pd.notna(v) else "" for v in rows["fp32_p50_ms"]]
        shown["vs_fp32"] = [f"{r:.2f}x" if r == r else "" for r in speedup]
        shown[f"{precision}_pays"] = [("yes" if bool(p) else "no") if pd.notna(p) else "" for p in faster]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}" if v < 1e4 else f"{v:.0f}")


def slower_line(rows, model_path: Path) -> Optional[str]:
    """One line when a model timed against its fp32 original is slower than it on the CPU at any batch size and
    its format says why (fp16), else None."""
    import pandas as pd

    note = format_of(read_metadata(model_path), model_path).slower_note
    cpu = rows[(rows["backend"] == "onnxruntime") & (rows["provider"] == "CPUExecutionProvider")]
    faster = cpu["faster_than_fp32"].fillna(cpu["int8_pays"])
    slower = cpu[[pd.notna(f) and not bool(f) for f in faster]]
    if not note or slower.empty:
        return None
    first = slower.iloc[0]
    sizes = ", ".join(str(int(b)) for b in slower["batch_size"])
    return (f"{first['precision']} is slower than fp32 on this CPU at batch {sizes} (p50 {first['p50_ms']:.3f} ms "
            f"against {first['fp32_p50_ms']:.3f} ms at batch {int(first['batch_size'])}): {note}")
