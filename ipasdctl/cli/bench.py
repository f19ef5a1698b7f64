"""`ipasdctl bench`: the latency of exported models (onnxruntime, and PyTorch eager). Thin: the work is in
deploy/bench.py."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import chain
from .app import app
from .options import QuietOpt, ThreadsOpt, use_threads


@app.command("bench")
def bench(
    ctx: typer.Context,
    models: Annotated[Optional[list[Path]], typer.Argument(
        metavar="[MODEL|FOLDER]...", show_default=False,
        help="Exported .onnx models, or folders of them (every .onnx inside; in a chain: default, every model "
             "exported before).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8,64",
    threads: ThreadsOpt = None,
    runs: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 200,
    warmup: Annotated[Optional[int], typer.Option(help="Untimed calls first (default: max(5, runs/10)).")] = None,
    torch_run: Annotated[Optional[Path], typer.Option("--torch", help="Run folder to time in PyTorch eager (default: the run recorded in the export's json).")] = None,
    no_torch: Annotated[bool, typer.Option("--no-torch", help="Time onnxruntime only.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder (or .csv path) for latency.csv (default: beside the model).")] = None,
    provider: Annotated[Optional[str], typer.Option(help="Time on this onnxruntime execution provider only: cpu, cuda or tensorrt (the last two need onnxruntime-gpu; PyTorch then runs on CUDA). Default: the CPU, and CUDA where present.")] = None,
    quiet: QuietOpt = False,
) -> "chain.Outputs":
    """Latency of exported models (onnxruntime, and PyTorch eager): p50/p90/p99 and throughput (at the median
    latency) per batch size. The table goes to stdout, with one line when an fp16 model is slower than its fp32
    original on the CPU; progress and warnings (p99 > 5x p50) to stderr. In a chain, a model already measured on
    this CPU with the same settings is not measured again."""
    import sys

    from ..deploy.bench import bench as run_bench
    from ..deploy.bench import expand_models, format_table, slower_line, unstable_rows
    from ..runtime import cpu_model

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    _check_bench(locals())  # before the first model
    use_threads(threads)
    given = chain.link(ctx)
    models = expand_models(given.inputs(models, "an exported .onnx model", "bench", "models"))
    made = chain.Outputs()
    torch_timed: set = set()  # a run's checkpoint is timed in PyTorch once, not once per exported precision
    for path in models:  # one after another: a model is never timed while another runs
        rows, csv_path = run_bench(path, batch_sizes, threads, runs, warmup, torch_run, out, with_torch=not no_torch,
                                   log=None if quiet else say, skip_measured=given.skip_measured,
                                   torch_timed=torch_timed, provider=provider)
        for warning in unstable_rows(rows):
            say(warning)
        typer.echo(f"{path.name}: {cpu_model()}, {int(rows['threads'].iloc[0])} threads, {runs} runs per size"
                   + (" (measured before on this CPU, kept)" if rows.attrs.get("skipped") else ""))
        typer.echo(format_table(rows))
        slower = slower_line(rows, path)
        if slower:
            typer.echo(slower)
        typer.echo(str(csv_path))
        made.latency_tables.append(Path(csv_path))
    return made


@chain.precheck("bench")
def _check_bench(params: dict) -> None:
    from ..deploy.bench import check_bench_options

    check_bench_options(params["batch_sizes"], params["runs"], params["threads"], params["warmup"],
                        params["provider"])
