"""What many test modules share: the CLI run in-process, the tiny demo recipe, the tiny CIFAR command line,
and copies of a shared run folder. Fixtures live in tests/conftest.py; this module holds plain functions.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent  # the checkout: PYTHONPATH and cwd of the tests' subprocesses


TIMING_COLUMNS = frozenset({"epoch_seconds", "images_per_second"})  # metrics.csv's wall-clock columns


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`ipasdctl ARGS` in this process: (exit code, stdout, stderr)."""
    from ipasdctl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def run_cli_here(args: list[str], env: dict | None = None) -> tuple[int, str, str]:
    """`ipasdctl ARGS` in this process with one torch thread and the variables `env` set for the call:
    (exit code, stdout, stderr). For module fixtures, which have no capsys: what a `python -m ipasdctl`
    subprocess with OMP_NUM_THREADS=1 computes, without the ~3 s of CPU a new process spends importing torch."""
    import contextlib
    import io

    import torch

    from ipasdctl.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            with pytest.raises(SystemExit) as exit_info:
                main(args)
    finally:
        torch.set_num_threads(threads)
    return exit_info.value.code, out.getvalue(), err.getvalue()


def only_line(err: str) -> str:
    """The one line of `err` (what the CLI printed on stderr), asserting there is one and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli_error(args: list[str], capsys) -> str:
    """`ipasdctl ARGS` in this process, which must fail as bad input does: exit 2 and exactly one stderr line
    `error: ...` without a traceback. Returns that line."""
    code, _, err = run_cli(args, capsys)
    assert code == 2, (args, err)
    line = only_line(err)
    assert line.startswith("error: "), err
    return line


def train_ok(args: list[str]) -> None:
    """`ipasdctl ARGS` in this process, which must succeed."""
    from ipasdctl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


def tiny_recipe(method: str | dict | None = None, *, epochs: int = 1, batch_size: int = 32, subset: int = 64,
                sets: Sequence[str] = (), **sections: dict):
    """The demo recipe (digits, resnet8) cut small: `subset` training digits, `epochs`, `batch_size`, on the CPU.

    `method` is a method name or a dict of method keys (the recipe's own, ipasd, when left out); `sections`
    (train=, data=, optim=, ...) are merged over that, then `sets` (the command line's --set values)."""
    from ipasdctl.config import deep_merge, load_recipe, parse_set

    overrides: dict = {"train": {"epochs": epochs, "batch_size": batch_size, "device": "cpu"},
                       "data": {"train_subset": subset}}
    if method is not None:
        overrides["method"] = {"name": method} if isinstance(method, str) else dict(method)
    overrides = deep_merge(deep_merge(overrides, sections), parse_set(list(sets)))
    return load_recipe("demo", overrides)


def tiny_cifar_args(data_root, out, *extra) -> list[str]:
    """`train` on a CIFAR folder, two steps an epoch (32 images, batch 16, resnet8, ce, no warm-up)."""
    return ["train", "--dataset", "cifar10", "--data", str(data_root), "--arch", "resnet8", "--method", "ce",
            "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out),
            "--set", "data.train_subset=32", "--set", "optim.warmup_epochs=0", *extra]


def copy_run(run_dir: Path, target: Path) -> Path:
    """A private copy of a shared run folder at `target` (without its lock), to change or resume."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def snapshot(run_dir: Path) -> dict:
    """Every file of a folder with its bytes: equal snapshots mean nothing was changed."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_no_run_folder(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


# ------------------------------------------------------------------------------------ hostile files, made by hand

# the deployment metadata of a digits model, for ONNX files made by hand
DIGITS = {"dataset": "digits", "input_size": "[3, 16, 16]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]",
          "class_names": json.dumps([str(d) for d in range(10)])}


def tiny_onnx(path, metadata: dict) -> str:
    """A small valid ONNX model (global average pool of 3 x 8 x 8 images) with the given metadata strings."""
    import onnx

    from tests.robustness.fuzz_loaders import tiny_onnx_model

    model = tiny_onnx_model()
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return str(path)


def picture(path: Path, size: int = 16) -> Path:
    """A one-colour RGB image file."""
    from PIL import Image

    Image.new("RGB", (size, size), (120, 30, 200)).save(path)
    return path


class Payload:
    """Unpickling this runs open(path, 'w'): the file appearing means the payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class SystemPayload:
    """Unpickling this runs `touch path` in a shell."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def start_cli(args: list[str], signal_at: str | None = None) -> subprocess.Popen:
    """`python -m ipasdctl ARGS` in a process of its own, one torch thread (tests run several at once on a small
    machine), output piped; `signal_at` sets the engine's test hook IPASDCTL_TEST_SIGNAL_AT_STEP ("N[:SIGNAL]":
    after global step N the process sends itself the signal, SIGKILL by default)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("IPASDCTL_DEBUG", None)
    env.pop("IPASDCTL_TEST_SIGNAL_AT_STEP", None)  # never inherited from the test process
    if signal_at:
        env["IPASDCTL_TEST_SIGNAL_AT_STEP"] = signal_at
    return subprocess.Popen([sys.executable, "-m", "ipasdctl", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv's rows as strings, as written."""
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def metrics_without_timings(run_dir: Path) -> list[dict]:
    """metrics.csv's rows without the wall-clock columns: what two runs of the same work must agree on."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in metrics_rows(run_dir)]
