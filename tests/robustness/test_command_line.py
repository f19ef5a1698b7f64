"""Hostile command-line values: the bad-input catalogue of docs/errors.md (one test per row), sizes and counts
bounded with the bound in the message, non-finite numbers, names that are not plain folder names, resume
options against the run's own recipe.

Every row: exit code 2 and one line on stderr ("error: what is wrong; how to fix it"), no traceback, and no run
folder left behind (a run folder that existed before is left as it was). IPASDCTL_DEBUG=1 turns the line into
the exception itself (a traceback).
"""

from __future__ import annotations

import importlib
import os
import re

import pytest
import torch
import yaml

from ipasdctl import runtime, training
from ipasdctl.cli import main
from ipasdctl.config import load_recipe, parse_set
from ipasdctl.deploy.bench import check_bench_options
from ipasdctl.errors import UserError
from ipasdctl.studies.executors import make_executor
from ipasdctl.training import train
from tests.helpers import assert_no_run_folder, cli_error, copy_run, snapshot, tiny_cifar_args, tiny_onnx


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


ROWS = {
    # row id: (extra train arguments (callable of tmp_path and the tiny CIFAR root), expected part of the line)
    "unknown-method": (lambda t, d: ["--method", "ipasdd"], "unknown method 'ipasdd' (did you mean 'ipasd'?); known: "),
    "unknown-arch": (lambda t, d: ["--arch", "resnet9"], "unknown arch 'resnet9' (did you mean '"),
    "unknown-dataset": (lambda t, d: ["--dataset", "cifar1O"], "unknown dataset 'cifar1O' (did you mean 'cifar10'?)"),
    "unknown-recipe": (lambda t, d: ["--recipe", "demoo"], "recipe 'demoo' not found"),
    "unknown-recipe-key-set": (lambda t, d: ["--set", "train.epoch=3"],
                               "unknown recipe key 'train.epoch' (did you mean 'epochs'?)"),
    "unknown-recipe-key-yaml": (lambda t, d: ["--recipe", write_recipe(t, "optim:\n  lrr: 0.1\n")],
                                "unknown recipe key 'optim.lrr' (did you mean 'lr'?)"),
    "unknown-method-parameter": (lambda t, d: ["--set", "method.w_dvi=0.5"],
                                 "unknown recipe key 'method.w_dvi' (did you mean 'w_div'?)"),
    "wrong-type-set": (lambda t, d: ["--set", "optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
    "wrong-type-yaml": (lambda t, d: ["--recipe", write_recipe(t, "train: {epochs: many}\n")],
                        "train.epochs must be an integer, got 'many'"),
    "wrong-type-section": (lambda t, d: ["--recipe", write_recipe(t, "train: 5\n")],
                           "train must be a mapping of keys to values, got 5"),
    "malformed-yaml": (lambda t, d: ["--recipe", write_recipe(t, "name: x\ntrain:\n  epochs: 3\n  batch_size: [1, 2\n"
                                                                  "optim:\n  lr: 0.1\n")],
                       "is not valid YAML at line 5, column 6"),
    "malformed-yaml-tab": (lambda t, d: ["--recipe", write_recipe(t, "train:\n  epochs: 3\n\tseed: 1\n")],
                           "is not valid YAML at line 3, column 1"),
    "data-folder-missing": (lambda t, d: ["--dataset", "cifar10", "--data", str(t / "nowhere")],
                            f"nowhere does not exist; point --data at the folder that contains cifar-10-batches-py/ "
                            f"(the 'python version' from {CIFAR_URL})"),
    "data-folder-without-cifar": (lambda t, d: ["--dataset", "cifar10", "--data", str(t)],
                                  "does not contain cifar-10-batches-py/; point --data at the folder holding it"),
    "data-option-missing": (lambda t, d: ["--dataset", "cifar10"], "cifar10 needs --data DIR"),
    "epochs-zero": (lambda t, d: ["--epochs", "0"], "epochs must be a positive integer, got 0"),
    "epochs-negative": (lambda t, d: ["--epochs", "-3"], "epochs must be a positive integer, got -3"),
    "batch-size-zero": (lambda t, d: ["--batch-size", "0"], "batch size must be a positive integer, got 0"),
    "batch-size-negative": (lambda t, d: ["--batch-size", "-4"], "batch size must be a positive integer, got -4"),
    "lr-zero": (lambda t, d: ["--lr", "0"], "learning rate must be a positive number, got 0.0"),
    "lr-negative": (lambda t, d: ["--lr", "-0.1"], "learning rate must be a positive number, got -0.1"),
    "lr-nan": (lambda t, d: ["--set", "optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    "batch-larger-than-data": (lambda t, d: ["--dataset", "cifar10", "--data", str(d), "--batch-size", "500"],
                               "batch size 500 is larger than the training set (200 images)"),
    "out-is-a-file": (lambda t, d: ["--out", str(t / "a-file")], "is a file, not a folder"),
    "out-under-a-file": (lambda t, d: ["--out", str(t / "a-file" / "runs")], "a-file is a file, not a folder; choose a writable --out"),
    "seed-not-integer": (lambda t, d: ["--seed", "abc"], "Invalid value for '--seed'"),
    "seed-not-integer-set": (lambda t, d: ["--set", "train.seed=1.5"], "train.seed must be an integer, got 1.5"),
    "seed-negative": (lambda t, d: ["--seed", "-1"], "seed must be an integer from 0 to 2^63-1, got -1"),
    "cuda-missing": (lambda t, d: ["--device", "cuda"], "--device cuda was requested but CUDA is not available"),
    "cuda-index-missing": (lambda t, d: ["--device", "cuda:1"], "--device cuda:1 was requested but CUDA is not available"),
    "fp16-on-cpu": (lambda t, d: ["--device", "cpu", "--precision", "fp16"], "precision fp16 needs a CUDA device"),
    "resume-missing-folder": (lambda t, d: ["--resume", str(t / "no-run")], "no such run folder"),
    "method-name-not-a-string": (lambda t, d: ["--recipe", write_recipe(t, "method: {name: [ce]}\n")],
                                 "the method must be a name, got list ['ce']"),
    "method-tau-zero": (lambda t, d: ["--method", "ipasd", "--set", "method.tau=0"], "method.tau must be positive, got 0"),
    "val-split-zero": (lambda t, d: ["--set", "data.val_split=0"],
                       "data.val_split must be a positive number of training images, got 0"),
    "val-split-too-large": (lambda t, d: ["--set", "data.val_split=5000"],
                            "data.val_split=5000 leaves no training image (the training set has 1438)"),
    "label-noise-kind": (lambda t, d: ["--set", "data.label_noise.kind=uniform"],
                         "data.label_noise.kind must be symmetric or pairflip, got 'uniform'"),
    "label-noise-rate": (lambda t, d: ["--set", "data.label_noise.rate=1.5"],
                         "data.label_noise.rate must be at least 0 and below 1"),
    "label-noise-key": (lambda t, d: ["--set", "data.label_noise.rat=0.2"],
                        "unknown recipe key 'data.label_noise.rat' (did you mean 'rate'?)"),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(row, tmp_path, tiny_cifar, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "CUDA requested where there is none"
    (tmp_path / "a-file").write_text("not a folder\n")
    extra, expected = ROWS[row]
    out = tmp_path / "runs"
    line = cli_error(["train", "--out", str(out), *extra(tmp_path, tiny_cifar)], capsys)
    assert expected in line, line
    assert_no_run_folder(out)


def test_output_folder_without_write_permission(tmp_path, capsys, monkeypatch):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: make access() answer as it does for everyone else
        real_access = os.access
        monkeypatch.setattr("ipasdctl.runs.folder.os.access",
                            lambda path, mode: False if os.path.samefile(path, out) and mode & os.W_OK
                            else real_access(path, mode))
    try:
        for target in (out, out / "runs"):
            line = cli_error(["train", "--out", str(target)], capsys)
            assert f"{out} is not writable; choose another --out" in line, line
        assert not any(out.iterdir())
    finally:
        out.chmod(0o755)


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("IPASDCTL_DEBUG", "1")
    with pytest.raises(UserError, match="unknown method 'ipasdd'"):
        main(["train", "--out", str(tmp_path / "runs"), "--method", "ipasdd"])


def test_resume_with_a_different_recipe_is_refused(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    line = cli_error(["train", "--resume", str(run_dir), "--set", "optim.lr=0.2"], capsys)
    assert f"--resume {run_dir}: the given recipe differs from the run's (" in line and "optim.lr" in line
    assert "resume without recipe options, or start a new run" in line
    other = write_recipe(tmp_path, "train:\n  epochs: 5\n")
    assert "train.epochs" in cli_error(["train", "--resume", str(run_dir), "--recipe", other], capsys)
    assert snapshot(run_dir) == before  # nothing written, no lock left


def test_resume_recipe_compares_the_options_with_the_runs_own_recipe(finished_run):
    """training.resume_recipe: without --recipe, the options go over the run's saved recipe, so the refusal
    names exactly the keys the options change (what `train --resume RUN --set ...` should report)."""
    from ipasdctl import training
    from ipasdctl.config import parse_set

    run_dir, _ = finished_run
    assert training.resume_recipe(run_dir, None, {}) is None
    same = training.resume_recipe(run_dir, None, parse_set(["train.epochs=1"]))
    assert training.resume(run_dir, same, training.Progress(enabled=False)) == run_dir  # the run's own: accepted
    changed = training.resume_recipe(run_dir, None, parse_set(["optim.lr=0.2", "train.seed=3"]))
    with pytest.raises(UserError) as info:
        training.resume(run_dir, changed)
    assert "differs from the run's (optim.lr, train.seed);" in str(info.value)


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/ipasdctl-absolute-name", "..", "a/b"])
def test_train_name_must_be_a_plain_folder_name(name, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "deep" / "runs"
    line = cli_error(tiny_cifar_args(tiny_cifar, out, "--epochs", "1", "--name", name), capsys)
    assert f"--name {name!r} must be a plain folder name" in line
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/tmp/ipasdctl-absolute-name")
    assert_no_run_folder(out)


def test_eval_of_a_folder_named_like_a_model_says_what_it_is(tmp_path, capsys):
    (tmp_path / "dir.onnx").mkdir()
    line = cli_error(["eval", str(tmp_path / "dir.onnx")], capsys)
    assert "is a folder, not a file" in line and "does not exist" not in line


def test_eval_of_a_read_only_run_folder_suggests_no_option_eval_lacks(finished, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(finished, tmp_path / "run")
    real_access = os.access
    monkeypatch.setattr("ipasdctl.analysis.evaluation.os.access",
                        lambda path, mode: False if os.path.samefile(path, run_dir) and mode & os.W_OK
                        else real_access(path, mode))
    line = cli_error(["eval", str(run_dir), "--device", "cpu"], capsys)
    assert f"{run_dir} is not writable" in line and "--out" not in line


@pytest.mark.parametrize("option,expected", [
    ("data.image_size=100000", "data.image_size must be from 8 to 4096 pixels, got 100000"),
    ("data.num_workers=500", "data.num_workers must be from 0 (decode in the training process) to 64, got 500"),
])
def test_image_folder_sizes_are_bounded(option, expected, tmp_path, capsys):
    line = cli_error(["train", "--dataset", "imagefolder", "--data", str(tmp_path), "--out", str(tmp_path / "runs"),
                    "--set", option], capsys)
    assert expected in line


def test_bench_threads_and_onnx_input_size_are_bounded(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {"input_size": "[3, 8, 8]"})
    assert "--threads must be from 1 to " in cli_error(["bench", model, "--threads", "100000", "--no-torch"], capsys)
    huge = tiny_onnx(tmp_path / "huge.onnx", {"input_size": "[3, 100000, 100000]", "dataset": "digits"})
    expected = "has malformed metadata: 'input_size' is [3, 100000, 100000], expected [channels (1-4), height, width (1-4096"
    assert expected in cli_error(["bench", huge, "--runs", "1", "--no-torch"], capsys)
    assert expected in cli_error(["eval", huge], capsys)


@pytest.mark.parametrize("option,expected", [
    ("train.epochs=1180591620717411303424", "train.epochs must be an integer from -2^63 to 2^63-1, got 1180591620717411303424"),
    ("optim.momentum=.inf", "optim.momentum must be a finite number, got inf"),
    ("method.tau=.nan", "method.tau must be a finite number, got nan"),
])
def test_non_finite_and_huge_numbers_are_refused_at_parse_time(option, expected, tmp_path, capsys):
    line = cli_error(["train", "--method", "ipasd", "--out", str(tmp_path / "runs"), "--set", option], capsys)
    assert expected in line


bench_module = importlib.import_module("ipasdctl.deploy.bench")  # the package's `bench` is the function


def test_bench_batch_sizes_are_bounded_by_the_input_size_and_memory(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {"input_size": "[3, 8, 8]"})
    largest = (runtime.memory_bytes() // 2) // (32 * 4 * 3 * 8 * 8)
    with pytest.raises(UserError):  # here first: before the fix bench timed the batch (whatever memory it took)
        bench_module.check_batch_memory([largest + 1], [3, 8, 8])
    line = cli_error(["bench", model, "--batch-sizes", f"1,{largest + 1}", "--runs", "1", "--no-torch"], capsys)
    assert f"--batch-sizes {largest + 1} is too large for 3x8x8 images on this machine" in line
    assert f"so at most {largest} images" in line


def test_bench_runs_and_compare_threads_per_job_are_bounded(tmp_path, capsys):
    for runs, warmup, expected in ((10**12, None, "--runs must be from 1 to 100000, got 1000000000000"),
                                   (1, 10**12, "--warmup must be from 0 to 100000, got 1000000000000")):
        with pytest.raises(UserError, match=expected):  # here first: before the fix bench ran 10^11 warm-up calls
            check_bench_options("1", runs, None, warmup)
    model = tiny_onnx(tmp_path / "m.onnx", {"input_size": "[3, 8, 8]"})
    assert "--runs must be from 1 to 100000, got 1000000000000" in cli_error(
        ["bench", model, "--runs", str(10**12), "--no-torch"], capsys)
    assert "--warmup must be from 0 to 100000, got 1000000000000" in cli_error(
        ["bench", model, "--warmup", str(10**12), "--no-torch"], capsys)
    cpus = runtime.available_cpus()
    expected = f"--threads-per-job must be from 1 to {4 * cpus} (4 x this machine's {cpus} CPUs), got 500"
    with pytest.raises(UserError, match=re.escape(expected)):  # here first: before the fix compare trained
        make_executor(load_recipe("demo"), threads=500)
    line = cli_error(["compare", "--recipe", "demo", "--epochs", "1", "--threads-per-job", "500", "--out",
                    str(tmp_path / "cmp")], capsys)
    assert expected in line and not (tmp_path / "cmp").exists()
