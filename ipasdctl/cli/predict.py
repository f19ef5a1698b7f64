"""`ipasdctl predict`: the top classes of image files, from an exported .onnx model or a run folder."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Argument(metavar="MODEL.onnx|RUN_FOLDER",
                                          help="An exported .onnx model, or a run folder (its checkpoint, in PyTorch).")],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files, or folders of them.")],
    top_k: Annotated[int, typer.Option("--top-k", help="How many classes to print per image.")] = 5,
    checkpoint: Annotated[Optional[str], typer.Option(help="Run folders only: best or last (default: best).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document with every prediction.")] = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,  # predict prints its results only: nothing to leave out
) -> list:
    """Classify image files: the top-k classes and their probabilities per image.

    The images are preprocessed as the model's test set was (its input size, mean and std)."""
    from ..deploy.predict import predict as run_predict

    use_threads(threads)
    predictions = run_predict(model, images, top_k, checkpoint)
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in predictions], indent=2))
    else:
        for p in predictions:
            typer.echo(f"{p.image}: " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in zip(p.classes, p.probabilities)))
    return predictions
