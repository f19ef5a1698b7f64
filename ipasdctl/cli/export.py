"""`ipasdctl export`: ONNX, validated against PyTorch, optional static INT8. Thin: the work is in deploy/."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads


@app.command("export")
def export(
    ctx: typer.Context,
    run_folder: Annotated[Optional[Path], typer.Argument(
        help="Run folder of a finished `ipasdctl train` (in a chain: default, every run folder made before).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", show_default=False, help="Export to ONNX (so far the one format, so "
                                       "the flag may be left out).")] = True,
    out: Annotated[Path, typer.Option(help="Folder for <name>.onnx and <name>.json.")] = Path("exports"),
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's own).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write <name>-int8.onnx: static QDQ quantization, per-channel weights.")] = False,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Training images used to calibrate INT8 ranges.")] = 512,
    int8_target: Annotated[str, typer.Option("--int8-target", help="CPU the INT8 model is for: auto (this CPU), avx2 (U8S8, 7-bit weights), avx512-vnni (U8S8), arm64 (S8S8).")] = "auto",
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    data: Annotated[Optional[Path], typer.Option(help="Folder holding the data set's files, if not where the run found them.")] = None,
    name: Annotated[Optional[str], typer.Option(help="File name stem (default: what the model is, <dataset>-<arch>-<method>-s<seed>, from the run's recipe).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model of the same name exported from another run (all of its files).")] = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> "chain.Outputs":
    """Export a run's evaluation network to ONNX (dynamic batch), check it against PyTorch and measure its test
    top-1 in onnxruntime; prints the .onnx path last (with -q, only the path(s)). In a chain, an export whose
    source checkpoint is unchanged is kept as it is."""
    from ..deploy import export_onnx
    from ..deploy.export_names import check_targets
    from ..errors import UserError

    _check_export(locals())
    use_threads(threads)
    given = chain.link(ctx)
    run_folders = given.inputs(run_folder, "a run folder", "export", "run_dirs")
    if name is not None and len(run_folders) > 1:
        raise UserError(f"--name names one export, but this chain exports {len(run_folders)} runs; drop --name")
    check_targets(run_folders, out, checkpoint, name, overwrite)  # every name, before the first export
    made = chain.Outputs(exports_dir=out)
    for folder in run_folders:
        record = export_onnx(folder, out, opset=opset, int8=int8, calib_samples=calib_samples, int8_target=int8_target,
                             checkpoint=checkpoint,
                             data_root=str(data) if data is not None else None, name=name,
                             skip_unchanged=given.skip_unchanged, overwrite=overwrite)
        _print_export(record, quiet)
        made.models += [Path(record["onnx_path"])] + ([Path(record["int8"]["onnx_path"])] if "int8" in record else [])
    return made


@chain.precheck("export")
def _check_export(params: dict) -> None:
    from ..deploy.export import check_export_options

    check_export_options(params["opset"], params["int8"], params["calib_samples"], params["checkpoint"],
                         params["int8_target"])


def _print_export(record: dict, quiet: bool) -> None:
    """What the export did (unless quiet), then the model paths, the fp32 one last."""
    if record.get("skipped"):
        if not quiet:
            typer.echo(f"{record['onnx_path']}: its checkpoint is unchanged since it was exported, kept")
    elif not quiet:
        worst = max(b["max_abs_diff"] for b in record["validation"]["batches"])
        sizes = ",".join(str(b["batch_size"]) for b in record["validation"]["batches"])
        typer.echo(f"exporter: {record['exporter']} (opset {record['opset']})"
                   + (f"; fallback because {record['fallback_reason']}" if record["fallback_reason"] else ""))
        typer.echo(f"validated against PyTorch at batch {sizes}: max |diff| {worst:.2e} "
                   f"(atol {record['validation']['atol']:g}, rtol {record['validation']['rtol']:g})")
        typer.echo(f"size: {record['file_size_bytes'] / 1e6:.2f} MB")
        if record.get("temperature"):
            typer.echo(f"temperature {record['temperature']:.4f} folded in (ipasdctl calibrate): the output is "
                       "logits / T")
        test = record["onnx_test"]
        typer.echo(f"test top-1 (onnxruntime, {test['n']} images): fp32 {test['top1']:.2f}%"
                   + (f"  int8 {record['int8']['test_top1']:.2f}%  ({record['int8']['file_size_bytes'] / 1e6:.2f} MB)"
                      if "int8" in record else ""))
        if "int8" in record:
            typer.echo(f"int8: {record['int8']['quantization']}")
            speed = record["int8"]["speed_check"]
            if not speed["int8_pays"]:
                typer.echo(f"int8 is not faster than fp32 on this CPU for this model: p50 at batch 1 "
                           f"{speed['int8_p50_ms']:.3f} ms against {speed['fp32_p50_ms']:.3f} ms ({speed['runs']} runs "
                           "each); ship the fp32 model or confirm with `ipasdctl bench`")
    if "int8" in record:
        typer.echo(record["int8"]["onnx_path"])
    typer.echo(record["onnx_path"])
