"""`ipasdctl export`: ONNX in one or several formats (fp32, INT8, fp16), validated against PyTorch. Thin: the work
is in deploy/ (the pipeline in export.py, one module per format in formats/)."""

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
    formats: Annotated[Optional[str], typer.Option("--format", help="Comma-separated formats: onnx (fp32), onnx-int8, "
                                                   "onnx-fp16 (`ipasdctl list formats`). The fp32 file is written "
                                                   "too: INT8 and fp16 are made from it. Default: onnx.")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", show_default=False, help="Alias of --format onnx (the default, so "
                                       "the flag may be left out).")] = True,
    out: Annotated[Path, typer.Option(help="Folder for <name>.onnx and <name>.json.")] = Path("exports"),
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's own).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write <name>-int8.onnx (alias of adding onnx-int8 to --format): static QDQ quantization, per-channel weights.")] = False,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Training images used to calibrate INT8 ranges.")] = 512,
    int8_target: Annotated[str, typer.Option("--int8-target", help="CPU the INT8 model is for: auto (this CPU), avx2 (U8S8, 7-bit weights), avx512-vnni (U8S8), arm64 (S8S8).")] = "auto",
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    data: Annotated[Optional[Path], typer.Option(help="Folder holding the data set's files, if not where the run found them.")] = None,
    name: Annotated[Optional[str], typer.Option(help="File name stem (default: what the model is, <dataset>-<arch>-<method>-s<seed>, from the run's recipe).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model of the same name exported from another run (all of its files).")] = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> "chain.Outputs":
    """Export a run's evaluation network to ONNX (dynamic batch) in each --format, check each file against
    PyTorch and measure its test top-1 in onnxruntime; prints the .onnx paths, the fp32 one last (with -q, only
    the paths). In a chain, an export whose source checkpoint is unchanged is kept as it is."""
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
                             checkpoint=checkpoint, formats=formats,
                             data_root=str(data) if data is not None else None, name=name,
                             skip_unchanged=given.skip_unchanged, overwrite=overwrite)
        _print_export(record, quiet)
        made.models += [Path(p) for p in record["exported"].values()]
    return made


@chain.precheck("export")
def _check_export(params: dict) -> None:
    from ..deploy.export import check_export_options

    check_export_options(params["opset"], params["int8"], params["calib_samples"], params["checkpoint"],
                         params["int8_target"], params["formats"])


def _print_export(record: dict, quiet: bool) -> None:
    """What the export did (unless quiet), then the model paths, the fp32 one last."""
    from ..deploy.export import derived_summaries

    derived = derived_summaries(record)
    if record.get("skipped"):
        if not quiet:
            typer.echo(f"{record['onnx_path']}: its checkpoint is unchanged since it was exported, kept")
    elif not quiet:
        typer.echo(f"exporter: {record['exporter']} (opset {record['opset']})"
                   + (f"; fallback because {record['fallback_reason']}" if record["fallback_reason"] else ""))
        typer.echo(_validated(record["precision"], record["validation"]))
        typer.echo(f"size: {record['file_size_bytes'] / 1e6:.2f} MB")
        if record.get("temperature"):
            typer.echo(f"temperature {record['temperature']:.4f} folded in (ipasdctl calibrate): the output is "
                       "logits / T")
        test = record["onnx_test"]
        typer.echo(f"test top-1 (onnxruntime, {test['n']} images): {record['precision']} {test['top1']:.2f}%"
                   + "".join(f"  {d['precision']} {d['test_top1']:.2f}%  ({d['file_size_bytes'] / 1e6:.2f} MB)"
                             for d in derived))
        for summary in derived:
            if "atol" in summary.get("validation", {}):
                typer.echo(_validated(summary["precision"], summary["validation"]))
        if "int8" in record:
            typer.echo(f"int8: {record['int8']['quantization']}")
            speed = record["int8"]["speed_check"]
            if not speed["int8_pays"]:
                typer.echo(f"int8 is not faster than fp32 on this CPU for this model: p50 at batch 1 "
                           f"{speed['int8_p50_ms']:.3f} ms against {speed['fp32_p50_ms']:.3f} ms ({speed['runs']} runs "
                           "each); ship the fp32 model or confirm with `ipasdctl bench`")
    for summary in derived:
        typer.echo(summary["onnx_path"])
    typer.echo(record["onnx_path"])


def _validated(precision: str, validation: dict) -> str:
    worst = max(b["max_abs_diff"] for b in validation["batches"])
    sizes = ",".join(str(b["batch_size"]) for b in validation["batches"])
    agreement = min(b["top1_agreement"] for b in validation["batches"])
    return (f"{precision} validated against PyTorch at batch {sizes}: max |diff| {worst:.2e} "
            f"(atol {validation['atol']:g}, rtol {validation['rtol']:g}); top-1 agreement {100 * agreement:.1f}%")
