"""`ipasdctl tune`: an Optuna study of one method's parameters, optim.lr and optim.weight_decay on a recipe's
validation split (the library side is studies/tune.py)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import (DEFAULT_RECIPE, ArchOpt, BatchOpt, DataOpt, DatasetOpt, DeviceOpt, DevicesOpt, EpochsOpt, JobsOpt,
                      LrOpt, PrecisionOpt, QuietOpt, RayOpt, RecipeOpt, SetOpt, ThreadsPerJobOpt, recipe_overrides)


@app.command()
def tune(
    ctx: typer.Context,
    trials: Annotated[int, typer.Option(help="Trials the study holds when done (a rerun adds the missing ones).")],
    recipe: RecipeOpt = None,
    method: Annotated[Optional[str], typer.Option(help="The method to tune (default: the recipe's).")] = None,
    space: Annotated[Optional[Path], typer.Option(
        help="YAML file of recipe keys and ranges that replaces the default space (the method's declared "
             "ranges, optim.lr, optim.weight_decay); README: Tuning.")] = None,
    storage: Annotated[Optional[str], typer.Option(
        help="Optuna storage URL (e.g. postgresql://user@host/db) for trials from several machines "
             "(default: study.db, SQLite, in the study folder).")] = None,
    pruner: Annotated[str, typer.Option(
        help="median (stop a trial whose val top-1 falls below the median of earlier trials at the same epoch), "
             "halving (successive halving) or none; both from a third of a trial's epochs on.")] = "median",
    arch: ArchOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Study folder (default: studies/<recipe name>-<method>); one run folder per trial goes in it.")] = None,
    quiet: QuietOpt = False,
    jobs: JobsOpt = None,
    devices: DevicesOpt = None,
    threads_per_job: ThreadsPerJobOpt = None,
    ray: RayOpt = None,
) -> "chain.Outputs":
    """Tune a method with Optuna (TPE, a pruner) on the recipe's validation split (data.val_split), then write
    trials.csv, best.yaml, summary.md and plots/; prints the study folder last.

    A rerun of the same command continues the study: finished trials are kept, a killed or interrupted trial
    is re-run from its checkpoint. `compare --tuned STUDY` then runs the method with the best trial's parameters.
    Several trials at once: --jobs N (this machine's cores or GPUs) or --ray ADDRESS (a cluster), as compare.
    """
    from .. import training
    from ..config import load_recipe
    from ..studies import tune as tuning
    from ..studies.executors import make_executor

    settings = tuning.TuneSettings(trials=trials, out=out, space=space, storage=storage, pruner=pruner)
    settings.check()  # before the recipe: the cheapest mistakes first
    base = training.resolve_recipe(load_recipe(recipe or DEFAULT_RECIPE, recipe_overrides(ctx.params)))
    executor = make_executor(base, jobs, devices, threads_per_job, ray, training.Progress(enabled=False))
    say = None if quiet else tuning.say_on_stderr
    try:
        folder = tuning.run(base, settings, progress_enabled=not quiet, say=say, executor=executor)
    except training.Interrupted as exc:
        import sys

        print(f"interrupted: checkpoint written in {exc.run_dir}; rerun the same `ipasdctl tune` command to "
              "continue the study", file=sys.stderr)
        raise SystemExit(exc.code) from None
    typer.echo(str(folder))
    return chain.Outputs(studies=[folder])
