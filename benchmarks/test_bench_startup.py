"""Start-up time of the CLI: `--help`, a command's `--help`, `list` (its cache warm) and `--version`, each in a
fresh process (`python -m ipasdctl ...`), median wall time of several runs, for this working tree ("after") and
for the commit before the fast start (IPASDCTL_STARTUP_BASE, default ae0943d; "before"), extracted with
`git archive` into a temporary folder. Runs alternate before/after, so machine load hits both alike.

    .venv/bin/python -m pytest benchmarks/test_bench_startup.py --benchmark-only -s
"""

import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import report

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("IPASDCTL_STARTUP_BASE", "ae0943d")
COMMANDS = (["--help"], ["train", "--help"], ["eval", "--help"], ["list"], ["--version"])


def _extract(commit: str, into: Path) -> Path:
    archive = into / "base.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "base", filter="data")
    return into / "base"


def _seconds(tree: Path, args: list[str], cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "IPASDCTL_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ipasdctl", *args], env=env, cwd=tree, capture_output=True)
    seconds = time.perf_counter() - start
    return seconds if done.returncode == 0 else float("nan")  # nan: the command did not exist then


def test_startup_before_and_after(benchmark, tmp_path):
    runs = int(os.environ.get("IPASDCTL_BENCH_RUNS", "5"))
    try:
        base = _extract(BASE, tmp_path)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip(f"commit {BASE} is not in this clone's history")
    cache = tmp_path / "cache"
    _seconds(ROOT, ["list"], cache)  # fills the list cache (the first `list` after a change imports the registries)

    def measure():
        times = {(tree, tuple(a)): [] for tree in ("before", "after") for a in COMMANDS}
        for _ in range(runs):
            for args in COMMANDS:
                for label, tree in (("before", base), ("after", ROOT)):
                    times[(label, tuple(args))].append(_seconds(tree, args, cache))
        return [{"command": "ipasdctl " + " ".join(args),
                 "before_s": statistics.median(times[("before", tuple(args))]),
                 "after_s": statistics.median(times[("after", tuple(args))])} for args in COMMANDS]

    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    report(f"CLI start-up, median of {runs} runs ({os.cpu_count()} CPUs; before = {BASE}, nan = no such command)", rows)
