"""`ipasdctl prune`: structured pruning of a finished run with recovery training (the work is in compress/)."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads

# compress.recovery's defaults, spelled here so that --help imports no torch (tests/compress checks they agree)
DEFAULT_EPOCHS = 5
LR_SCALE = 0.1
ROUND_TO = 8


@app.command("prune")
def prune(
    ctx: typer.Context,
    run_folder: Annotated[Optional[Path], typer.Argument(
        metavar="[RUN_FOLDER]", help="A finished run folder (in a chain: default, every run folder made before).")] = None,
    target_macs: Annotated[Optional[float], typer.Option(
        "--target-macs", metavar="F", help="Keep this fraction of the run's MACs (0 < F < 1), e.g. 0.5.")] = None,
    target_latency_ms: Annotated[Optional[float], typer.Option(
        "--target-latency-ms", metavar="MS",
        help="Prune until the batch-1 latency on this CPU is at most MS (onnxruntime, fp32, p50), measured as it "
             "prunes.")] = None,
    importance: Annotated[str, typer.Option(
        metavar="magnitude|taylor|bn-scale",
        help="Which channels go: the L2 norm of their weights, |weight x gradient| on a few training batches, or "
             "the BatchNorm scale.")] = "magnitude",
    round_to: Annotated[int, typer.Option(
        "--round-to", metavar="N",
        help="Keep every pruned layer's channels a multiple of N (1: exact counts). onnxruntime's CPU kernels "
             "work on blocks of 8 (AVX2) or 16 (AVX-512) channels, GPUs' tensor cores on multiples of 8: uneven "
             "counts made the pruned network slower than the original (docs/performance.md).")] = ROUND_TO,
    steps: Annotated[int, typer.Option(
        metavar="K", help="Prune a share, recover, repeat K times (1: one shot).")] = 1,
    method: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Recovery method (ipasdctl list methods; default: the run's own).")] = None,
    epochs: Annotated[int, typer.Option(
        metavar="N", help="Recovery epochs of each step.")] = DEFAULT_EPOCHS,
    lr_scale: Annotated[float, typer.Option(
        "--lr-scale", metavar="X",
        help="The recovery's lr is the run's x X; it runs without warm-up on a cosine schedule, with the run's "
             "momentum and weight decay.")] = LR_SCALE,
    teacher_original: Annotated[bool, typer.Option(
        "--teacher-original", help="Distil from the unpruned run (method kd unless --method names another that "
                                   "takes a teacher; kd's default teacher is the unpruned run anyway).")] = False,
    checkpoint: Annotated[str, typer.Option(
        metavar="best|last", help="The run's checkpoint to prune (and each step's that the next step prunes).")] = "best",
    data: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Folder holding the data set's files, if not where the run found them.")] = None,
    device: Annotated[Optional[str], typer.Option(
        metavar="DEVICE", help="Recovery training on auto, cpu, cuda or cuda:N (default: the run's train.device); "
                               "pruning and latency are on the CPU.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Folder for the pruned run folder (default: beside the run).")] = None,
    name: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Pruned run folder name (default: <run>-pruned-<percent of MACs kept>, or "
                             "<run>-pruned-<MS>ms).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override any key of the recovery recipe: --set method.alpha=0.5 "
                                           "(repeatable).")] = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> "chain.Outputs":
    """Prune whole channels from a trained run (torch-pruning) and recover its accuracy by training; prints the
    pruned run folder last.

    The result is a new run folder beside the run (pruning.json says how it was made; the pruned shapes are in
    its config.yaml, so every command reads it). A rerun of the same command continues an interrupted prune; in a
    chain, a finished prune of the same settings is reused."""
    from .. import training
    from ..compress import prune_run
    from ..errors import Interrupted, UserError
    from ..runs import RunFolder

    settings = _check_prune(locals())
    use_threads(threads)
    given = chain.link(ctx)
    run_folders = given.inputs(run_folder, "a run folder", "prune", "run_dirs")
    if name is not None and len(run_folders) > 1:
        raise UserError(f"--name names one pruned run, but this chain prunes {len(run_folders)} runs; drop --name")
    progress = training.Progress(enabled=not quiet)
    made = chain.Outputs()
    for folder in run_folders:
        try:
            pruned = prune_run(folder, settings, out, name, reuse=given.reuse, progress=progress)
        except Interrupted as exc:  # not `train --resume`: a prune of several steps goes on after this one
            print(f"interrupted: checkpoint written in {exc.run_dir}; run the same `ipasdctl prune` again to "
                  "continue", file=sys.stderr)
            sys.exit(exc.code)
        summary = RunFolder(pruned).read_summary()
        if summary:
            progress.note(training.run_line(summary, pruned))
        typer.echo(str(pruned))
        made.run_dirs.append(Path(pruned))
    return made


@chain.precheck("prune")
def _check_prune(params: dict):
    """The settings of the command line, checked (before a chain trains anything)."""
    from ..compress import PruneSettings
    from ..config import parse_set

    return PruneSettings(target_macs=params["target_macs"], target_latency_ms=params["target_latency_ms"],
                         importance=params["importance"], round_to=params["round_to"], steps=params["steps"],
                         method=params["method"],
                         epochs=params["epochs"], lr_scale=params["lr_scale"],
                         teacher_original=params["teacher_original"], checkpoint=params["checkpoint"],
                         overrides=parse_set(params.get("set_") or []),
                         data=str(params["data"]) if params["data"] is not None else None,
                         device=params["device"]).check()
