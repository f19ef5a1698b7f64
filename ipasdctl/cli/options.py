"""Options shared by several commands, defined once, and how they become a recipe override.

Command modules import only typer (and these) at import time; the library is imported inside each command,
so `ipasdctl --help` does not import torch.
"""

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_RECIPE = "demo"

# option name -> the recipe key it sets (--set comes after these and wins)
RECIPE_KEYS = {
    "method": ("method", "name"),
    "arch": ("model", "arch"),
    "weights": ("model", "weights"),
    "dataset": ("data", "name"),
    "data": ("data", "root"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("optim", "lr"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "precision": ("train", "precision"),
    "compile": ("train", "compile"),
    "sync_bn": ("train", "sync_bn"),
    "track": ("train", "track"),
}

RecipeOpt = Annotated[Optional[str], typer.Option(
    "--recipe", "-r", metavar="NAME|PATH", help="Recipe: a YAML path or a name in recipes/ (default: demo).")]
MethodOpt = Annotated[Optional[str], typer.Option(metavar="NAME", help="Training method (ipasdctl list methods).")]
ArchOpt = Annotated[Optional[str], typer.Option(metavar="NAME", help="Model architecture (ipasdctl list models).")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    metavar="SPEC", help="Initial weights (recipe key model.weights): a .safetensors / .pt file, a run folder (RUN, "
                         "RUN:last), torchvision[:ENUM] for tv_* archs, timm[:TAG] for timm:<name> ones.")]
DatasetOpt = Annotated[Optional[str], typer.Option(metavar="NAME", help="Data set name (ipasdctl list datasets).")]
DataOpt = Annotated[Optional[Path], typer.Option(
    metavar="DIR", help="Folder holding the data set's files (e.g. the folder that contains cifar-10-batches-py/).")]
EpochsOpt = Annotated[Optional[int], typer.Option(metavar="N", help="Number of epochs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help="Training batch size.")]
LrOpt = Annotated[Optional[float], typer.Option(metavar="LR", help="Peak learning rate.")]
# the defaults named in these two are TrainConfig's (tests/cli/test_help.py checks that they agree)
SeedOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help="Random seed (default: the recipe's train.seed; 0 if it sets none).")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: the recipe's train.device; auto if it sets none: "
                           "CUDA where there is a GPU, else the CPU).")]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    metavar="PRECISION", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.")]
CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the network.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override any recipe key: --set optim.lr=0.05 (repeatable).")]
TrackOpt = Annotated[Optional[str], typer.Option(
    metavar="tensorboard|mlflow",
    help="Log the recipe, every epoch's metrics and the summary to TensorBoard or MLflow (recipe key train.track; "
         "needs the extra of the same name, ipasdctl[tensorboard] or ipasdctl[mlflow]).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output (results and errors still print).")]


def available_cpus() -> int:
    """The CPUs this process may run on (runtime.available_cpus without importing torch)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: Optional[int]) -> Optional[int]:
    """--threads is from 1 to 4 x the CPUs (checked when the command line is parsed, every link of a chain)."""
    from ..errors import UserError

    most = 4 * available_cpus()
    if threads is not None and not 0 < threads <= most:
        raise UserError(f"--threads must be from 1 to {most} (4 x this machine's {available_cpus()} CPUs), got {threads}")
    return threads


ThreadsOpt = Annotated[Optional[int], typer.Option(
    metavar="N", callback=check_threads,
    help="CPU threads for PyTorch and onnxruntime (default: PyTorch's count, one per core). On a busy or small "
         "machine 1 is often faster (README, --threads). In a chain it holds for the links after it too.")]

# where the runs of `compare` and the trials of `tune` train (studies/executors.py checks the values)
JobsOpt = Annotated[Optional[int], typer.Option(
    help="Train up to N runs at once on this machine (compare: its runs; tune: its trials), each in its own "
         "process: on CPU each gets cores / N threads, on CUDA its own GPU (default: 1, one run after another in "
         "this process; with --devices: one job per GPU named).")]
DevicesOpt = Annotated[Optional[str], typer.Option(
    help="CUDA: the GPUs the jobs share out, one job each, as indices of the visible GPUs (0,1,2,3; "
         "default: all of them).")]
ThreadsPerJobOpt = Annotated[Optional[int], typer.Option(
    "--threads-per-job", "--threads", metavar="N",
    help="torch threads per run (default: cores / --jobs; sequentially: PyTorch's own). The same count "
         "gives bitwise the same CPU results whatever the executor. --threads is the same option, as every "
         "command that computes has it.")]
RayOpt = Annotated[Optional[str], typer.Option(
    metavar="ADDRESS",
    help="Run each run as a Ray task (one GPU, or --threads-per-job CPUs): 'local' (a Ray instance on "
         "this machine), 'auto' (the cluster this machine belongs to) or HOST:PORT. --out must be on a "
         "file system every node mounts. Needs pip install 'ipasdctl[ray]'.")]


def use_threads(threads: Optional[int]) -> None:
    """Apply --threads (None: leave the count as it is) to torch and to the onnxruntime sessions opened after."""
    if threads is not None:
        from ..runtime import set_threads

        set_threads(threads)


def recipe_overrides(params: dict) -> dict:
    """The command-line options (a command's parameters by name) as a nested recipe override; --set comes
    last and wins. An option left out (None, or a flag not given) sets nothing."""
    from ..config import deep_merge, parse_set

    nested: dict = {}
    for name, (section, key) in RECIPE_KEYS.items():
        value = params.get(name)
        if value is None or (name == "sync_bn" and value is False):
            continue
        nested.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    return deep_merge(nested, parse_set(params.get("set_") or []))


def command_line(ctx: typer.Context, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives this command its current parameters again, without `leave_out` (what each
    process of `train --nproc` runs): every option as given, read from the command's own definition."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in leave_out or value is None or not param.opts:
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if getattr(param, "is_flag", False):
            if value:
                args.append(flag)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args
