"""`ipasdctl eval`: test-set metrics, calibration and embedding plots of one run or .onnx model. Thin: the work is
in analysis/."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads


@app.command("eval")
def eval_(
    ctx: typer.Context,
    target: Annotated[Optional[Path], typer.Argument(
        metavar="[RUN_FOLDER|MODEL.onnx]",
        help="A run folder written by `ipasdctl train`, or an exported .onnx model (in a chain: default, every "
             "run folder made before).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Folder holding the data set's files, if not where the run found them.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Which checkpoint of a run folder: best (default) or last.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Run folder: auto (default), cpu, cuda or cuda:N (a .onnx model runs on onnxruntime's CPU).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Evaluation batch size (default: the run's train.eval_batch_size; 256 for .onnx).")] = None,
    tsne_points: Annotated[Optional[int], typer.Option(help="Run folder: at most this many test images in the t-SNE plot (default: 2000).")] = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate on the test set: top-1/top-5, NLL, ECE with a reliability diagram, per-class accuracy,
    feature compactness, t-SNE of the embeddings. Writes eval.json, per_class.csv, reliability.png and
    embedding_tsne.png into the run folder; a .onnx model (onnxruntime) gets the same but the embedding figures,
    as <model>.eval.json, <model>.per_class.csv and <model>.reliability.png beside it."""
    _check_eval(locals())
    targets = chain.link(ctx).inputs(target, "a run folder or a .onnx model", "eval", "run_dirs")
    _refuse_run_options_for_onnx(targets, checkpoint, device, tsne_points)  # before the (slow) library import
    from ..analysis import evaluation

    use_threads(threads)
    for index, path in enumerate(targets, start=1):
        if len(targets) > 1 and not quiet:
            print(f"[{index}/{len(targets)}] eval {path}", file=sys.stderr, flush=True)
        if path.suffix.lower() == ".onnx":
            result = evaluation.eval_onnx_model(path, data, batch_size or 256, progress=not quiet)
            typer.echo(evaluation.format_summary(result))
            typer.echo(str(evaluation.onnx_eval_paths(path)["eval.json"]))
            continue
        result = evaluation.eval_run(path, checkpoint or "best", data, device or "auto", batch_size,
                                     evaluation.TSNE_POINTS if tsne_points is None else tsne_points,
                                     progress=not quiet)
        typer.echo(evaluation.format_summary(result))
        typer.echo(str(path / "eval.json"))


def _refuse_run_options_for_onnx(targets: list, checkpoint, device, tsne_points) -> None:
    from ..errors import UserError

    onnx = any(Path(t).suffix.lower() == ".onnx" for t in targets)
    refused = [option for option, value in (("--checkpoint", checkpoint), ("--device", device),
                                            ("--tsne-points", tsne_points)) if onnx and value is not None]
    if refused:
        raise UserError(f"{', '.join(refused)} do{'es' if len(refused) == 1 else ''} not apply to a .onnx model "
                        "(it holds one set of weights, runs on onnxruntime's CPU and gives logits only); "
                        "leave it out, or evaluate the run folder")


@chain.precheck("eval")
def _check_eval(params: dict) -> None:
    from ..errors import UserError
    from ..safe_io import check_checkpoint

    if params["batch_size"] is not None and params["batch_size"] <= 0:
        raise UserError(f"--batch-size must be positive, got {params['batch_size']}")
    if params["tsne_points"] is not None and params["tsne_points"] < 3:
        raise UserError(f"--tsne-points must be at least 3, got {params['tsne_points']}")
    if params["checkpoint"] is not None:
        check_checkpoint(params["checkpoint"])
