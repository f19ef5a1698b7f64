"""`ipasdctl report`: plots and report.md from run and comparison folders. Thin: the work is in
analysis/report.py."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads


@app.command("report")
def report(
    ctx: typer.Context,
    dirs: Annotated[Optional[list[Path]], typer.Argument(
        metavar="[DIR...]", help="Run folders and/or comparison folders (with results.csv) (in a chain: default, "
                                 "the comparisons, else the run folders made before).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where report.md and its images go (default: the first DIR).")] = None,
    exports: Annotated[Optional[Path], typer.Option(
        help="Folder of exported models: adds the selection table (in a chain: default, the export folder).")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", help="Latency budget for the selection table (ms).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Data folder for runs that still need an eval.")] = None,
    device: Annotated[str, typer.Option(help="Device for runs that still need an eval: auto, cpu, cuda or cuda:N.")] = "auto",
    tsne_points: Annotated[int, typer.Option(help="At most this many test images in the t-SNE of runs that still need an eval.")] = 2000,
    no_tsne: Annotated[bool, typer.Option("--no-tsne", help="No t-SNE panel, and no t-SNE for runs that still need an eval (its slowest part).")] = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Training curves, summary table, loss terms, calibration and embedding plots (and the selection
    table with --exports) of runs and comparisons, as report.md with its images; prints its path."""
    from ..analysis.report import build_report

    _check_report(locals())
    use_threads(threads)
    given = chain.link(ctx)
    dirs = given.inputs(dirs, "run folders or comparison folders", "report", "comparisons", "run_dirs")
    exports = exports if exports is not None else given.exports_dir
    path = build_report(dirs, out, exports, max_latency_ms, data, device, tsne_points, progress=not quiet,
                        with_tsne=not no_tsne)
    typer.echo(str(path))


@chain.precheck("report")
def _check_report(params: dict) -> None:
    from ..analysis.report import check_budget
    from ..errors import UserError

    if params["tsne_points"] < 3:
        raise UserError(f"--tsne-points must be at least 3, got {params['tsne_points']}")
    check_budget(params["max_latency_ms"])
