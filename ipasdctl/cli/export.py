"""`ipasdctl export` (ONNX, validated against PyTorch, optional static INT8) and `ipasdctl bench` (latency)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app


@app.command("export")
def export(
    run_folder: Annotated[Path, typer.Argument(help="Run folder of a finished `ipasdctl train`.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the one format so far).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for <name>.onnx and <name>.json.")] = Path("exports"),
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's own).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write <name>-int8.onnx: static QDQ quantization, per-channel weights.")] = False,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Training images used to calibrate INT8 ranges.")] = 512,
    int8_target: Annotated[str, typer.Option("--int8-target", help="CPU the INT8 model is for: auto (this CPU), avx2 (U8S8, 7-bit weights), avx512-vnni (U8S8), arm64 (S8S8).")] = "auto",
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    data: Annotated[Optional[Path], typer.Option(help="Folder holding the data set's files, if not where the run found them.")] = None,
    name: Annotated[Optional[str], typer.Option(help="File name stem (default: the run folder's name).")] = None,
) -> None:
    """Export a run's evaluation network to ONNX (dynamic batch), check it against PyTorch; prints the .onnx path last."""
    from ..deploy import export_onnx
    from ..errors import UserError

    if not onnx:
        raise UserError("choose an export format: ipasdctl export RUN_FOLDER --onnx")
    record = export_onnx(run_folder, out, opset=opset, int8=int8, calib_samples=calib_samples, int8_target=int8_target,
                         checkpoint=checkpoint, data_root=str(data) if data is not None else None, name=name)
    worst = max(b["max_abs_diff"] for b in record["validation"]["batches"])
    sizes = ",".join(str(b["batch_size"]) for b in record["validation"]["batches"])
    typer.echo(f"exporter: {record['exporter']} (opset {record['opset']})"
               + (f"; fallback because {record['fallback_reason']}" if record["fallback_reason"] else ""))
    typer.echo(f"validated against PyTorch at batch {sizes}: max |diff| {worst:.2e} "
               f"(atol {record['validation']['atol']:g}, rtol {record['validation']['rtol']:g})")
    typer.echo(f"size: {record['file_size_bytes'] / 1e6:.2f} MB")
    if "int8" in record:
        typer.echo(f"test top-1 (onnxruntime, {record['onnx_test']['n']} images): fp32 {record['onnx_test']['top1']:.2f}%  "
                   f"int8 {record['int8']['test_top1']:.2f}%  ({record['int8']['file_size_bytes'] / 1e6:.2f} MB)")
        typer.echo(f"int8: {record['int8']['quantization']}")
        speed = record["int8"]["speed_check"]
        if not speed["int8_pays"]:
            typer.echo(f"int8 is not faster than fp32 on this CPU for this model: p50 at batch 1 "
                       f"{speed['int8_p50_ms']:.3f} ms against {speed['fp32_p50_ms']:.3f} ms ({speed['runs']} runs each); ship the fp32 model or "
                       "confirm with `ipasdctl bench`")
        typer.echo(record["int8"]["onnx_path"])
    typer.echo(record["onnx_path"])


@app.command("bench")
def bench(
    model: Annotated[Path, typer.Argument(help="An exported .onnx model.")],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8,64",
    threads: Annotated[Optional[int], typer.Option(help="Threads for both backends (default: PyTorch's count).")] = None,
    runs: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 200,
    warmup: Annotated[Optional[int], typer.Option(help="Untimed calls first (default: max(5, runs/10)).")] = None,
    torch_run: Annotated[Optional[Path], typer.Option("--torch", help="Run folder to time in PyTorch eager (default: the run recorded in the export's json).")] = None,
    no_torch: Annotated[bool, typer.Option("--no-torch", help="Time onnxruntime only.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder (or .csv path) for latency.csv (default: beside the model).")] = None,
) -> None:
    """Latency of an exported model (onnxruntime, and PyTorch eager): p50/p90/p99 and throughput per batch size."""
    import sys

    from ..deploy.bench import bench as run_bench
    from ..deploy.bench import format_table
    from ..runtime import cpu_model

    rows, csv_path = run_bench(model, batch_sizes, threads, runs, warmup, torch_run, out, with_torch=not no_torch,
                               log=lambda line: print(line, file=sys.stderr))
    typer.echo(f"{model.name}: {cpu_model()}, {int(rows['threads'].iloc[0])} threads, {runs} runs per size")
    typer.echo(format_table(rows))
    typer.echo(str(csv_path))
