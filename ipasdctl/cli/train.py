"""`ipasdctl train`: one method, one recipe, one run folder (or several processes with --nproc)."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import (DEFAULT_RECIPE, ArchOpt, BatchOpt, CompileOpt, DataOpt, DatasetOpt, DeviceOpt, EpochsOpt, LrOpt,
                      MethodOpt, PrecisionOpt, QuietOpt, RecipeOpt, SeedOpt, SetOpt, ThreadsOpt, TrackOpt,
                      WeightsOpt, command_line, recipe_overrides, use_threads)


@app.command()
def train(
    ctx: typer.Context,
    recipe: RecipeOpt = None,
    method: MethodOpt = None,
    arch: ArchOpt = None,
    weights: WeightsOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    compile: CompileOpt = None,
    track: TrackOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Folder where run folders are created.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Run folder name (default: dataset-arch-method-sSEED).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option(
        metavar="RUN_FOLDER", help="Continue this run folder from its last checkpoint.")] = None,
    quiet: QuietOpt = False,
    nproc: Annotated[Optional[int], typer.Option(
        metavar="N", help="Train with N processes on this machine (one per GPU on CUDA): relaunches this command through "
             "torchrun. The batch size stays the global batch.")] = None,
    sync_bn: Annotated[bool, typer.Option(
        "--sync-bn", help="Several processes on CUDA: BatchNorm statistics over the global batch.")] = False,
) -> "chain.Outputs":
    """Train one model with one method on one recipe; prints the run folder's path last.

    Its last line on stderr sums the run up: best- and last-epoch test top-1, the best epoch, the wall time.
    Several processes: `torchrun --nproc_per_node N -m ipasdctl train ...`, or `ipasdctl train --nproc N ...`.
    In a chain (`train ... export --onnx bench`), a finished run of the same name and recipe is reused."""
    from .. import training
    from ..config import load_recipe
    from ..runs import RunFolder
    from ..training import distributed, launcher

    overrides = recipe_overrides(ctx.params)
    if nproc is not None and nproc != 1:
        new_recipe = None if resume is not None else training.resolve_recipe(load_recipe(recipe or DEFAULT_RECIPE,
                                                                                          overrides))
        # typer.Exit would end with 0 (standalone_mode off)
        sys.exit(launcher.launch(nproc, command_line(ctx, leave_out=("nproc",)), new_recipe))
    use_threads(threads)
    rank = distributed.context_from_env()
    progress = training.Progress(enabled=not quiet)
    finished_before = resume is not None and RunFolder(resume).state() == "finished"  # resume says so itself
    try:
        if resume is not None:
            given = training.resume_recipe(resume, recipe, overrides)
            run_dir = training.resume(resume, given, progress)
        else:
            run_dir = training.train(training.resolve_recipe(load_recipe(recipe or DEFAULT_RECIPE, overrides)), out,
                                     name, progress, reuse=chain.link(ctx).reuse)
    except training.Interrupted as exc:
        if not rank.is_main:  # rank 0 says how to resume; the others stop quietly with the same status
            sys.exit(exc.code)
        raise
    if rank.is_main:  # the closing line on stderr; the only line on stdout: the run folder
        summary = None if finished_before else RunFolder(run_dir).read_summary()
        if summary:
            progress.note(training.run_line(summary, run_dir))
        typer.echo(str(run_dir))
    return chain.Outputs(run_dirs=[Path(run_dir)])


@chain.precheck("train")
def _check_train_in_a_chain(params: dict) -> None:
    from ..errors import UserError

    if params["nproc"] not in (None, 1):
        raise UserError("train --nproc runs in processes of its own and cannot start a chain; run it alone, then "
                        "chain the next commands on its run folder (e.g. ipasdctl export RUN --onnx bench)")
