"""The `ipasdctl` command line: thin Typer commands over library functions.

Every user error is one line on stderr and exit code 2; IPASDCTL_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError

app = typer.Typer(
    name="ipasdctl",
    help="Train compact image classifiers with IPASD self-distillation, compare them with other "
         "self-distillation methods, report, and export to ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEFAULT_RECIPE = "demo"


def recipe_overrides(method=None, arch=None, dataset=None, data=None, epochs=None, batch_size=None, lr=None,
                     seed=None, device=None, precision=None, compile=None, sets=None) -> dict:
    """The command-line options as a nested recipe override; --set comes last and wins."""
    from .config import deep_merge, parse_set

    nested: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            nested.setdefault(section, {})[key] = value

    put("method", "name", method)
    put("model", "arch", arch)
    put("data", "name", dataset)
    put("data", "root", str(data) if data is not None else None)
    put("train", "epochs", epochs)
    put("train", "batch_size", batch_size)
    put("optim", "lr", lr)
    put("train", "seed", seed)
    put("train", "device", device)
    put("train", "precision", precision)
    put("train", "compile", compile)
    return deep_merge(nested, parse_set(sets or []))


RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe: a YAML path or a name in recipes/ (default: demo).")]
MethodOpt = Annotated[Optional[str], typer.Option(help="Training method (ipasdctl list).")]
ArchOpt = Annotated[Optional[str], typer.Option(help="Model architecture (ipasdctl list).")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="Data set name (ipasdctl list).")]
DataOpt = Annotated[Optional[Path], typer.Option(help="Folder holding the data set's files (e.g. the folder that contains cifar-10-batches-py/).")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Number of epochs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Training batch size.")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.")]
CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the network.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any recipe key: --set optim.lr=0.05 (repeatable).")]
OutOpt = Annotated[Path, typer.Option(help="Folder where run folders are created.")]


@app.command()
def train(
    recipe: RecipeOpt = None,
    method: MethodOpt = None,
    arch: ArchOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    compile: CompileOpt = None,
    out: OutOpt = Path("runs"),
    name: Annotated[Optional[str], typer.Option(help="Run folder name (default: dataset-arch-method-sSEED).")] = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder from its last checkpoint.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    nproc: Annotated[Optional[int], typer.Option(
        help="Train with N processes on this machine (one per GPU on CUDA): relaunches this command through "
             "torchrun. The batch size stays the global batch.")] = None,
    sync_bn: Annotated[bool, typer.Option(
        "--sync-bn", help="Several processes on CUDA: BatchNorm statistics over the global batch.")] = False,
) -> None:
    """Train one model with one method on one recipe; prints the run folder's path last.

    Several processes: `torchrun --nproc_per_node N -m ipasdctl train ...`, or `ipasdctl train --nproc N ...`."""
    from . import distributed, engine
    from .config import deep_merge, load_recipe
    from .registry import load_all

    load_all()
    overrides = recipe_overrides(method, arch, dataset, data, epochs, batch_size, lr, seed, device, precision,
                                 compile, set_)
    if sync_bn:
        overrides = deep_merge({"train": {"sync_bn": True}}, overrides)  # --set still wins
    if nproc is not None and nproc != 1:
        args = _train_args(recipe, method, arch, dataset, data, epochs, batch_size, lr, seed, device, precision,
                           compile, out, name, set_, resume, quiet, sync_bn)
        new_recipe = None if resume is not None else load_recipe(recipe or DEFAULT_RECIPE, overrides)
        sys.exit(distributed.launch(nproc, args, new_recipe))  # typer.Exit would end with 0 (standalone_mode off)
    ctx = distributed.context_from_env()
    progress = engine.Progress(enabled=not quiet)
    try:
        if resume is not None:
            given = engine.resume_recipe(resume, recipe, overrides)
            run_dir = engine.resume(resume, given, progress)
        else:
            run_dir = engine.train(load_recipe(recipe or DEFAULT_RECIPE, overrides), out, name, progress)
    except engine.Interrupted as exc:
        if not ctx.is_main:  # rank 0 says how to resume; the others stop quietly with the same status
            sys.exit(exc.code)
        raise
    if ctx.is_main:  # the only line on stdout: the run folder
        typer.echo(str(run_dir))


def _train_args(recipe, method, arch, dataset, data, epochs, batch_size, lr, seed, device, precision, compile,
                out, name, sets, resume, quiet, sync_bn) -> list[str]:
    """The `train` command line of these options, without --nproc (what each launched process runs)."""
    args = ["train"]
    for flag, value in (("--recipe", recipe), ("--method", method), ("--arch", arch), ("--dataset", dataset),
                        ("--data", data), ("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr),
                        ("--seed", seed), ("--device", device), ("--precision", precision), ("--out", out),
                        ("--name", name), ("--resume", resume)):
        if value is not None:
            args += [flag, str(value)]
    if compile is not None:
        args.append("--compile" if compile else "--no-compile")
    for assignment in sets or []:
        args += ["--set", assignment]
    if quiet:
        args.append("--quiet")
    if sync_bn:
        args.append("--sync-bn")
    return args


@app.command("list")
def list_(
    what: Annotated[Optional[str], typer.Argument(help="methods, models, datasets or recipes (default: all).")] = None,
    models: Annotated[bool, typer.Option("--models", help="A table of every model: input size, parameters, MACs.")] = False,
) -> None:
    """Print the registered methods, models, data sets and the recipes in recipes/."""
    from .config import RECIPES_DIR
    from .registry import DATASETS, METHODS, MODELS, load_all

    load_all()
    if models:
        from .models.catalog import format_table, model_table

        typer.echo(format_table(model_table()))
        return
    groups = {
        "methods": METHODS.names(),
        "models": MODELS.names(),
        "datasets": DATASETS.names(),
        "recipes": sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")),
    }
    if what is not None and what not in groups:
        raise UserError(f"list takes one of {', '.join(groups)}, got '{what}'")
    for group, names in groups.items():
        if what in (None, group):
            typer.echo(f"{group}: {', '.join(names)}")


def _register_commands() -> None:
    from .commands import register_all

    register_all(app)


_register_commands()


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: one-line errors, exit 2."""
    from .runtime import debug_enabled

    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        if debug_enabled():
            raise
        from .distributed import hand_error_to_launcher

        if not hand_error_to_launcher(str(exc), exc.exit_code):  # under `train --nproc` the launcher prints it once
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except _interrupted() as exc:
        print(f"interrupted: checkpoint written; resume with: ipasdctl train --resume {exc.run_dir}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors from the click layer under Typer
        click_exc = _click_exceptions()
        if isinstance(exc, click_exc.ClickException):
            if debug_enabled():
                raise
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, typer.Abort):
            sys.exit(130)
        if not debug_enabled():
            from .distributed import hand_error_to_launcher

            if hand_error_to_launcher(str(exc), 1, traceback.format_exc()):  # under `train --nproc`
                sys.exit(1)
        raise
    else:
        sys.exit(0)


def _click_exceptions():
    """Typer >= 0.20 vendors click as typer._click; older releases use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older Typer
        from click import exceptions
    return exceptions


def _interrupted():
    from .engine import Interrupted

    return Interrupted


if __name__ == "__main__":
    main()
