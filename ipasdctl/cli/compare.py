"""`ipasdctl compare`: train the main method, the baselines and `ce` on one recipe with several seeds, and
tabulate them (the library side is studies/)."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import (DEFAULT_RECIPE, ArchOpt, BatchOpt, CompileOpt, DataOpt, DatasetOpt, DeviceOpt, DevicesOpt,
                      EpochsOpt, JobsOpt, LrOpt, PrecisionOpt, QuietOpt, RayOpt, RecipeOpt, SetOpt, ThreadsPerJobOpt,
                      TrackOpt, recipe_overrides)


@app.command()
def compare(
    ctx: typer.Context,
    baselines: Annotated[str, typer.Option(
        help="Comma-separated methods to compare with (ipasdctl list methods), or 'all'; ce is always "
             "trained as the reference.")] = "",
    recipe: RecipeOpt = None,
    method: Annotated[Optional[str], typer.Option(
        help="The main method (default: the recipe's, ipasd); --set method.x=... applies to it only.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated integer seeds; every method runs once per seed.")]
    = "0,1,2",
    arch: ArchOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    compile: CompileOpt = None,
    track: TrackOpt = None,
    set_: SetOpt = None,
    baseline_set: Annotated[Optional[list[str]], typer.Option(
        "--baseline-set", help="A baseline's own parameter, METHOD.KEY=VALUE (repeatable): e.g. "
                               "--baseline-set kd.teacher=RUN_FOLDER (a larger teacher trained first).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Comparison folder (default: comparisons/<recipe name>); run folders go in it as "
             "<method>-s<seed>/.")] = None,
    quiet: QuietOpt = False,
    tuned: Annotated[Optional[list[Path]], typer.Option(
        help="A study folder of `ipasdctl tune` (repeatable): its method runs with the study's best parameters "
             "(best.yaml), every other method at its defaults; in a chain after tune: every study made.")] = None,
    tune: Annotated[Optional[int], typer.Option(
        help="Tune every compared method first with the same budget of N Optuna trials on the validation split "
             "(data.val_split; study folders in <out>/tuning/), then compare them at their best parameters. "
             "Needs pip install 'ipasdctl[tune]'.")] = None,
    jobs: JobsOpt = None,
    devices: DevicesOpt = None,
    threads_per_job: ThreadsPerJobOpt = None,
    ray: RayOpt = None,
) -> "chain.Outputs":
    """Train the main method, every baseline and ce on one recipe with the same seeds, and tabulate them.
    A baseline's own parameters: --baseline-set kd.teacher=RUN (rows with a teacher are marked in summary.md).

    The main method is --method (default: the recipe's, ipasd); the tables are results.csv, summary.csv and
    summary.md; the comparison folder is printed last. A rerun skips finished runs and resumes interrupted ones. --set method.x=... sets the main method's
    parameters only; baselines use their defaults. tf-kd-self distils from the ce run of the same seed (and
    waits for it). Many runs at once: --jobs N (this machine) or --ray ADDRESS (a cluster); a crashed run is
    retried once from its checkpoint, then marked failed in the tables (exit status 1).
    """
    from .. import training
    from ..config import load_recipe
    from ..errors import UserError
    from ..studies import compare as comparing
    from ..studies import plan as planning
    from ..studies import tuned as tuned_runs
    from ..studies.executors import make_executor

    overrides = recipe_overrides(ctx.params)
    seed_list = planning.parse_seeds(seeds)  # before the recipe: the cheapest mistake to report first
    base = training.resolve_recipe(load_recipe(recipe or DEFAULT_RECIPE, overrides))
    tuned_studies = chain.link(ctx).inputs(tuned, "--tuned STUDY", "compare", "studies") if tuned is not None or (
        chain.link(ctx).made is not None and chain.link(ctx).made.studies) else []
    if tune is not None and tuned_studies:
        raise UserError("--tune N tunes every method itself; leave out --tuned (or chain after no tune), or --tune")
    say = None if quiet else comparing.say_on_stderr
    progress = training.Progress(enabled=not quiet)
    executor = make_executor(base, jobs, devices, threads_per_job, ray, progress)  # its options checked before tuning
    studies = tuned_runs.read_tuned(tuned_studies)
    if tune is not None:
        where = planning.plan(base, baselines, seed_list, out, baseline_params=baseline_set)  # every recipe checked
        studies = tuned_runs.tune_each(base, where.methods, tune, where.out, not quiet, say, executor)
    comparison = planning.plan(base, baselines, seed_list, out, studies, baseline_set)
    try:
        comparing.run(comparison, progress, say, executor)
    except training.Interrupted as exc:
        print(f"interrupted: checkpoint written in {exc.run_dir}; rerun the same `ipasdctl compare` command to "
              "continue", file=sys.stderr)
        raise SystemExit(exc.code) from None
    if not quiet:
        folder = comparison.folder
        comparing.say_on_stderr(f"tables: {folder.summary_markdown}, {folder.summary.name}, {folder.results.name}")
    typer.echo(str(comparison.out))
    return chain.Outputs(run_dirs=[run.run_dir for run in comparison.runs], comparisons=[comparison.out])
