"""The wall time of a 4-run comparison (ce and ipasd, seeds 0 and 1, the demo recipe) one run after another
versus `--jobs 2` (one process per run, one thread each), each a whole `ipasdctl compare` command (process
start-up included), on this machine's CPU cores.

Three ways: sequential with PyTorch's own thread count (what `compare` does without options), sequential with
one thread (`--threads-per-job 1`: the same numbers as `--jobs 2`, bitwise, which the benchmark checks), and
`--jobs 2`. On a machine shared with other work the figures move: run it when the machine is quiet.

    IPASDCTL_BENCH_EPOCHS=3 .venv/bin/python -m pytest benchmarks/test_bench_compare_parallel.py --benchmark-only -s
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from conftest import report

from ipasdctl.runtime import available_cpus, cpu_model

REPO = Path(__file__).resolve().parent.parent


def compare_seconds(out: Path, *options: str) -> float:
    epochs = os.environ.get("IPASDCTL_BENCH_EPOCHS", "3")
    command = [sys.executable, "-m", "ipasdctl", "compare", "--recipe", "demo", "--seeds", "0,1", "--epochs", epochs,
               "--device", "cpu", "--quiet", "--out", str(out), *options]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def test_compare_sequential_vs_two_jobs(benchmark, tmp_path):
    ways = {"sequential (PyTorch threads)": [], "sequential, --threads-per-job 1": ["--threads-per-job", "1"],
            "--jobs 2 (1 thread each)": ["--jobs", "2"]}

    def measure():
        return {name: compare_seconds(tmp_path / f"c{index}", *options)
                for index, (name, options) in enumerate(ways.items())}

    seconds = benchmark.pedantic(measure, rounds=1, iterations=1)
    base = seconds["sequential (PyTorch threads)"]
    rows = [{"executor": name, "wall_s": value, "speedup": base / value} for name, value in seconds.items()]
    report(f"4-run comparison (demo, ce + ipasd x seeds 0,1, {os.environ.get('IPASDCTL_BENCH_EPOCHS', '3')} epochs); "
           f"{cpu_model()}, {available_cpus()} cores", rows)
    benchmark.extra_info.update(seconds)
    timing = ["train_seconds", "images_per_second", "run_dir"]
    one_thread, jobs = (pd.read_csv(tmp_path / name / "results.csv").drop(columns=timing) for name in ("c1", "c2"))
    pd.testing.assert_frame_equal(one_thread, jobs)  # the same numbers, whichever executor
