"""`ipasdctl calibrate`: fit a temperature on a run's validation split (the work is in analysis/calibration.py)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads


@app.command("calibrate")
def calibrate(
    ctx: typer.Context,
    run_folder: Annotated[Optional[Path], typer.Argument(
        metavar="[RUN_FOLDER]", help="A run folder trained with a validation split (data.val_split) (in a chain: "
                                     "default, every run folder made before).")] = None,
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    data: Annotated[Optional[Path], typer.Option(help="Folder holding the data set's files, if not where the run found them.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Evaluation batch size (default: the run's train.eval_batch_size).")] = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fit a temperature to a run's validation split, so that its probabilities mean what they say.

    Temperature scaling: one T minimising NLL (L-BFGS), stored in temperature.json in the run folder, with NLL
    and ECE on the test set before and after. Accuracy does not change. `ipasdctl export` then folds T into the exported model (logits / T); prints the file last."""
    from ..analysis.calibration import calibrate_run, format_calibration
    from ..runs import RunFolder

    _check_calibrate(locals())
    use_threads(threads)
    for folder in chain.link(ctx).inputs(run_folder, "a run folder", "calibrate", "run_dirs"):
        result = calibrate_run(folder, checkpoint, data, device, batch_size)
        if not quiet:
            typer.echo(format_calibration(result))
        typer.echo(str(RunFolder(folder).temperature))


@chain.precheck("calibrate")
def _check_calibrate(params: dict) -> None:
    from ..errors import UserError
    from ..safe_io import check_checkpoint

    if params["batch_size"] is not None and params["batch_size"] <= 0:
        raise UserError(f"--batch-size must be positive, got {params['batch_size']}")
    check_checkpoint(params["checkpoint"])
