"""Issue 31, hostile files and faults round three: no recursion, no bomb, no formula, nothing silently replaced,
nothing left behind. One test (or a few) per item of the issue, each failing on the code before the fix.

The runs are the bundled digits (resnet8, 1 epoch on 64 images); the ONNX models are made by hand.
"""

from __future__ import annotations

import csv
import fcntl
import importlib
import io
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from ipasdctl import runtime
from ipasdctl.config import load_recipe
from ipasdctl.data.files import load_rgb
from ipasdctl.deploy.bench import check_bench_options
from ipasdctl.errors import UserError
from ipasdctl.files import FORMULA_STARTS, csv_text
from ipasdctl.runs import RunFolder, write_metrics_csv
from ipasdctl.studies.executors import make_executor
from ipasdctl.training import Progress, train
from ipasdctl.yaml_files import MAX_DEPTH, load_yaml
from fuzz_loaders import formula_cells, inflate_record
from test_bad_input import run_cli, tiny_args
from test_untrusted_input import tiny_onnx

bench_module = importlib.import_module("ipasdctl.deploy.bench")  # the package's `bench` is the function
DIGITS = {"dataset": "digits", "input_size": "[3, 16, 16]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]",
          "class_names": json.dumps([str(d) for d in range(10)])}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A finished 1-epoch demo run (copy it before changing it)."""
    recipe = load_recipe("demo", {"train": {"epochs": 1}, "data": {"train_subset": 64}})
    return train(recipe, tmp_path_factory.mktemp("runs"), progress=Progress(enabled=False))


def copy_run(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def picture(path: Path, size: int = 16) -> Path:
    Image.new("RGB", (size, size), (120, 30, 200)).save(path)
    return path


# ---------------------------------------------------------------------------------------- 1. deeply nested YAML


def test_a_deeply_nested_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("name: " + "[" * 50_000 + "]" * 50_000 + "\n")  # 100 kB, under the 1 MB recipe bound
    line = run_cli(["train", "--recipe", str(recipe), "--out", str(tmp_path / "runs")], capsys)
    assert f"recipe {recipe} nests deeper than {MAX_DEPTH} levels (at line 1, column {6 + MAX_DEPTH})" in line
    assert not (tmp_path / "runs").exists()


def test_deep_nesting_is_refused_in_set_values_config_yaml_and_comparison_yaml(demo_run, tmp_path, capsys):
    deep = "{a: " * 5000 + "1" + "}" * 5000
    assert f"--set name nests deeper than {MAX_DEPTH} levels" in run_cli(
        ["train", "--set", f"name={deep}", "--out", str(tmp_path / "runs")], capsys)
    run_dir = copy_run(demo_run, tmp_path / "run")
    (run_dir / "config.yaml").write_text(f"name: {deep}\n")
    with pytest.raises(UserError, match=f"config.yaml nests deeper than {MAX_DEPTH} levels .*; is .* a run folder"):
        RunFolder(run_dir).read_config()
    comparison = tmp_path / "cmp"
    copy_run(demo_run, comparison / "ce-s0")  # a trained run: compare reads the folder's comparison.yaml
    (comparison / "comparison.yaml").write_text(f"recipe: {deep}\n")
    line = run_cli(["compare", "--recipe", "demo", "--method", "ce", "--seeds", "0", "--epochs",
                    "1", "--out", str(comparison), "-q"], capsys)
    assert f"comparison.yaml nests deeper than {MAX_DEPTH} levels" in line and "choose another --out" in line


# ---------------------------------------------------------------------------------------- 2. duplicate keys


@pytest.mark.parametrize("text,key,lines", [
    ("name: dup\ntrain:\n  epochs: 1\nmodel: {arch: resnet8}\ntrain:\n  batch_size: 64\n", "train", "at lines 2 and 5"),
    ("train:\n  epochs: 1\n  seed: 3\n  epochs: 2\n", "epochs", "at lines 2 and 4"),
    ("optim: {lr: 0.1, momentum: 0.9, lr: 0.2}\n", "lr", "twice on line 1"),
])
def test_a_duplicate_key_is_one_line_naming_the_key_and_both_lines(text, key, lines, tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(text)  # (before: the second train: block alone, so 200 epochs, the default, and no word)
    with pytest.raises(UserError) as refused:
        load_recipe(str(recipe))
    assert f"recipe {recipe} gives the key '{key}' twice in one mapping ({lines}); keep one of them" in str(refused.value)


def test_train_refuses_a_recipe_with_a_duplicate_section_before_anything_is_made(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train:\n  epochs: 1\nmethod: ce\ntrain:\n  batch_size: 64\n")
    out = tmp_path / "runs"
    with pytest.raises(UserError):  # here first: before the fix this trained 200 epochs
        load_recipe(str(recipe))
    line = run_cli(["train", "--recipe", str(recipe), "--out", str(out)], capsys)
    assert "gives the key 'train' twice in one mapping (at lines 1 and 4)" in line and not out.exists()


def test_keys_merged_in_with_yaml_merge_keys_may_still_be_overridden():
    text = "a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 9\n"
    assert load_yaml(text, "t") == {"a": {"x": 1, "y": 2}, "c": {"x": 9, "y": 2}}


def test_a_duplicate_key_in_config_yaml_is_one_line(demo_run, tmp_path):
    run_dir = copy_run(demo_run, tmp_path / "run")
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text() + "train: {epochs: 9}\n")
    with pytest.raises(UserError, match=r"config.yaml gives the key 'train' twice in one mapping \(at lines \d+ and "):
        RunFolder(run_dir).read_config()


# ---------------------------------------------------------------------------------------- 3. checkpoint zip bombs


def test_a_checkpoint_that_inflates_far_beyond_its_size_is_refused_unread(demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path / "run")
    best = run_dir / "checkpoints" / "best.pt"
    inflate_record(best, 64 << 20)  # 64 MiB of zeros, deflated to ~64 kB
    assert best.stat().st_size < (64 << 20) // 50
    started = time.monotonic()
    for args in (["eval", str(run_dir), "--device", "cpu"], ["predict", str(run_dir), str(picture(tmp_path / "a.png"))]):
        line = run_cli(args, capsys)
        assert f"{best} is not a checkpoint ipasdctl wrote: its zip records inflate to 6" in line
        assert "beyond the bound of 2 x the file size + 1 MiB" in line and "refused unread" in line
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------- 4. onnxruntime at run time


def bad_bias_onnx(path: Path) -> Path:
    """A model that loads but fails inside session.run: its Conv has 10 channels and a bias of 11 values."""
    weight = numpy_helper.from_array(np.zeros((10, 3, 3, 3), np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(11, np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "weight", "bias"], ["features"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["features"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"])],
        "bad-bias", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in DIGITS.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_an_onnxruntime_error_at_run_time_is_one_line_in_bench_eval_and_predict(tmp_path, capfd):
    model = str(bad_bias_onnx(tmp_path / "bad.onnx"))
    image = str(picture(tmp_path / "a.png"))
    for args in (["bench", model, "--runs", "1", "--warmup", "0", "--batch-sizes", "1", "--no-torch", "-q"], ["eval", model],
                 ["predict", model, image]):
        line = run_cli(args, capfd)  # capfd: onnxruntime logs on file descriptor 2, below Python's sys.stderr
        assert f"onnxruntime cannot run {model}: Non-zero status code returned while running Conv node" in line, args
        assert "export it again with `ipasdctl export --onnx`" in line


# ---------------------------------------------------------------------------------------- 5. bounded typed sizes


def test_bench_batch_sizes_are_bounded_by_the_input_size_and_memory(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {"input_size": "[3, 8, 8]"})
    largest = (runtime.memory_bytes() // 2) // (32 * 4 * 3 * 8 * 8)
    with pytest.raises(UserError):  # here first: before the fix bench timed the batch (whatever memory it took)
        bench_module.check_batch_memory([largest + 1], [3, 8, 8])
    line = run_cli(["bench", model, "--batch-sizes", f"1,{largest + 1}", "--runs", "1", "--no-torch"], capsys)
    assert f"--batch-sizes {largest + 1} is too large for 3x8x8 images on this machine" in line
    assert f"so at most {largest} images" in line


def test_bench_runs_and_compare_threads_per_job_are_bounded(tmp_path, capsys):
    for runs, warmup, expected in ((10**12, None, "--runs must be from 1 to 100000, got 1000000000000"),
                                   (1, 10**12, "--warmup must be from 0 to 100000, got 1000000000000")):
        with pytest.raises(UserError, match=expected):  # here first: before the fix bench ran 10^11 warm-up calls
            check_bench_options("1", runs, None, warmup)
    model = tiny_onnx(tmp_path / "m.onnx", {"input_size": "[3, 8, 8]"})
    assert "--runs must be from 1 to 100000, got 1000000000000" in run_cli(
        ["bench", model, "--runs", str(10**12), "--no-torch"], capsys)
    assert "--warmup must be from 0 to 100000, got 1000000000000" in run_cli(
        ["bench", model, "--warmup", str(10**12), "--no-torch"], capsys)
    cpus = runtime.available_cpus()
    expected = f"--threads-per-job must be from 1 to {4 * cpus} (4 x this machine's {cpus} CPUs), got 500"
    with pytest.raises(UserError, match=re.escape(expected)):  # here first: before the fix compare trained
        make_executor(load_recipe("demo"), threads=500)
    line = run_cli(["compare", "--recipe", "demo", "--epochs", "1", "--threads-per-job", "500", "--out",
                    str(tmp_path / "cmp")], capsys)
    assert expected in line and not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------------------------------- 6. PIL's bomb warning


def test_an_image_past_pillows_pixel_bound_is_one_line_not_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = picture(tmp_path / "big.png", 40)  # 1,600 pixels: past the bound, below the 2x where Pillow raises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"big.png: it is too large \(1,600 pixels, beyond the bound of 1,000 "):
            load_rgb(str(path))
    assert caught == []
    model = tiny_onnx(tmp_path / "m.onnx", {**DIGITS, "input_size": "[3, 8, 8]"})
    line = run_cli(["predict", model, str(path)], capsys)  # one stderr line: no warning lines beside it
    assert "big.png: it is too large (1,600 pixels" in line


# ---------------------------------------------------------------------------------------- 7. formula injection


HOSTILE = ["=cmd|' /C calc'!A0", "@SUM(1+1)", "+1+2", "-2+3", "\tx", "\rx"]


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised():
    frame = pd.DataFrame({"arch": HOSTILE, "top1": [-0.5, 1.0, 2.0, 3.0, 4.0, 5.0], "=name": ["ok"] * 6})
    rows = list(csv.reader(io.StringIO(csv_text(frame), newline="")))
    assert rows[0] == ["arch", "top1", "'=name"]
    assert [r[0] for r in rows[1:]] == [f"'{cell}" for cell in HOSTILE]
    assert [r[1] for r in rows[1:]] == ["-0.5", "1", "2", "3", "4", "5"]  # numbers, negative ones too, stay numbers
    assert all(not cell.startswith(FORMULA_STARTS) for r in rows for cell in r if cell != "-0.5")


def test_every_csv_writer_neutralises_formula_cells(tmp_path):
    from ipasdctl.analysis.evaluation import per_class_csv
    from ipasdctl.analysis.selection import write_selection
    import torch

    write_metrics_csv(tmp_path / "metrics.csv", [{"epoch": 1, "note": "=1+2", "loss": -0.25}])
    write_selection(pd.DataFrame({"precision": ["=1+2"], "top1": [50.0]}), tmp_path / "selection.csv")
    (tmp_path / "per_class.csv").write_text(per_class_csv(["=cmd", "@x"], {"recall": torch.tensor([0.5, -1.0])}))
    for name in ("metrics.csv", "selection.csv", "per_class.csv"):
        assert formula_cells(tmp_path / name) == [], name
    assert "'=1+2" in (tmp_path / "selection.csv").read_text() and "-0.25" in (tmp_path / "metrics.csv").read_text()


def test_bench_of_a_model_named_like_a_formula_writes_no_formula(tmp_path, capsys):
    from ipasdctl.cli import main

    model = tiny_onnx(tmp_path / "=HYPERLINK(1).onnx", {"input_size": "[3, 8, 8]"})
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", model, "--runs", "2", "--warmup", "0", "--batch-sizes", "1", "--no-torch", "-q"])
    assert exit_info.value.code == 0
    assert formula_cells(tmp_path / "latency.csv") == []
    assert "'=HYPERLINK(1).onnx" in (tmp_path / "latency.csv").read_text()


def test_report_trusts_the_runs_own_config_over_hostile_results_cells(demo_run, tmp_path, capsys):
    from ipasdctl.cli import main

    summary = json.loads((demo_run / "summary.json").read_text())
    comparison = tmp_path / "cmp"
    run_name = f"{summary['method']}-s{summary['seed']}"
    copy_run(demo_run, comparison / run_name)
    row = {**{k: summary[k] for k in ("method", "seed", "epochs", "best_top1", "last_top1", "best_epoch")},
           "arch": "=cmd|' /C calc'!A0", "dataset": "@SUM(1+1)", "run_dir": run_name}
    pd.DataFrame([row]).to_csv(comparison / "results.csv", index=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(comparison), "--out", str(tmp_path / "report"), "--tsne-points", "20", "-q"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    runs = pd.read_csv(tmp_path / "report" / "report_runs.csv")
    assert list(runs["arch"]) == [summary["arch"]] and list(runs["dataset"]) == [summary["dataset"]]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "=cmd" not in text and "@SUM" not in text
    for written in (tmp_path / "report").glob("*.csv"):
        assert formula_cells(written) == [], written


# ---------------------------------------------------------------------------------------- 8. staging leftovers


def test_an_export_removes_the_staging_folders_killed_exports_left_and_keeps_a_live_ones(demo_run, tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    name = demo_run.name
    dead = out / f".{name}.k1lled00.tmp"
    (dead / "sub").mkdir(parents=True)
    (dead / f"{name}-int8.onnx").write_bytes(b"half")
    live = out / f".{name}.l1ve0000.tmp"
    live.mkdir()
    other = out / ".another-model.k1lled00.tmp"  # another export's leftovers: not this export's to judge
    other.mkdir()
    for folder in (dead, live, other):
        os.utime(folder, (time.time() - 3600, time.time() - 3600))
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running export holds its staging folder
    try:
        from ipasdctl.deploy.export import export_onnx

        export_onnx(demo_run, out, validation_batch_sizes=(1,))
    finally:
        os.close(held)
    assert not dead.exists() and live.is_dir() and other.is_dir()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{name}.json", f"{name}.onnx"]


# ---------------------------------------------------------------------------------------- 9. a full disk in INT8


def test_a_full_disk_during_int8_says_so(demo_run, tmp_path, monkeypatch, capsys):
    """quant_pre_process writes its model from C++: on a full disk the file ends short and onnx then reports
    "Wire format was corrupt"; the disk (here: reported full by statvfs) is the cause, and is named."""
    import onnxruntime.quantization.shape_inference as shape_inference

    import ipasdctl.files as files_module

    out = tmp_path / "exports"

    def short_write(source, target, **_):
        Path(target).write_bytes(Path(source).read_bytes()[:100])  # what fitted on the disk

    real_statvfs = os.statvfs

    class Full:
        def __init__(self, real):
            self.f_frsize, self.f_bavail = real.f_frsize, 0

    monkeypatch.setattr(shape_inference, "quant_pre_process", short_write)
    monkeypatch.setattr(files_module.os, "statvfs",
                        lambda p: Full(real_statvfs(p)) if str(p).startswith(str(out)) else real_statvfs(p))
    line = run_cli(["export", str(demo_run), "--onnx", "--int8", "--calib-samples", "16", "--out", str(out)], capsys)
    assert f"cannot write into {out}: No space left on device (0 kB free" in line
    assert "free disk space or choose another --out" in line
    assert list(out.iterdir()) == []  # nothing half-written, no staging folder


# ---------------------------------------------------------------------------------------- 10. a vanished run folder


@pytest.mark.parametrize("removed", ["folder", "lock"])
def test_a_run_folder_deleted_while_it_trains_stops_the_run_and_is_not_recreated(removed, tiny_cifar, tmp_path,
                                                                                 monkeypatch, capsys):
    out, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    real_epoch_line = Progress.epoch_line

    def epoch_line_then_remove(self, bar, row, epochs):
        real_epoch_line(self, bar, row, epochs)
        if row["epoch"] == 1:  # after epoch 1's checkpoint and metrics.csv
            if removed == "folder":
                shutil.rmtree(run_dir)
            else:
                (run_dir / ".lock").unlink()

    monkeypatch.setattr(Progress, "epoch_line", epoch_line_then_remove)
    line = run_cli(tiny_args(tiny_cifar, out, "--epochs", "2", "--name", "r"), capsys)
    assert f"run folder {run_dir} vanished while the run trained (its config.yaml or .lock is gone)" in line
    if removed == "folder":
        assert not run_dir.exists()  # no half folder: no metrics.csv or checkpoints without config.yaml
        return
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # the header and epoch 1: whole
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").exists()
    monkeypatch.setattr(Progress, "epoch_line", real_epoch_line)
    with pytest.raises(SystemExit) as exit_info:
        from ipasdctl.cli import main

        main(["train", "--resume", str(run_dir), "--quiet"])
    assert exit_info.value.code == 0
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True


# ---------------------------------------------------------------------------------------- predict on no regular file


def test_predict_on_a_fifo_or_a_device_says_what_it_is(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx", {**DIGITS, "input_size": "[3, 8, 8]"})
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    assert f"{fifo} is a FIFO (named pipe), not an image file" in run_cli(["predict", model, str(fifo)], capsys)
    assert f"{device} is a symlink to /dev/zero, which is a character device, not an image file" in run_cli(
        ["predict", model, str(device)], capsys)
    assert f"{dangling} is a symlink to {tmp_path / 'nowhere.png'}, which does not exist" in run_cli(
        ["predict", model, str(dangling)], capsys)
