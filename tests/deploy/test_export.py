"""ONNX export, validation against PyTorch, INT8, evaluation with onnxruntime, latency bench, bad input.

One tiny run (resnet8, 1 epoch on 64 digits) is trained and exported (fp32 + INT8) once for the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from ipasdctl import cli
from ipasdctl.deploy.bench import bench, parse_batch_sizes, summarize, unstable_rows
from ipasdctl.data import build_data
from ipasdctl.runs import load_model as load_run_model
from ipasdctl.training.meters import test_metrics as evaluate
from ipasdctl.errors import UserError
from ipasdctl.deploy import onnx_test_accuracy as evaluate_onnx
from ipasdctl.deploy import read_metadata
from ipasdctl.deploy.export import (ExportValidationError, compare_outputs, export_onnx,
                                    validate_against_torch)


@pytest.fixture(scope="session")
def run_dir(demo_run) -> Path:
    """The session's shared demo run (read-only)."""
    return demo_run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("exports")
    record = export_onnx(run_dir, out, int8=True, calib_samples=32, validation_batch_sizes=(1, 3, 8))
    return {"out": out, "record": record, "fp32": out / f"{run_dir.name}.onnx",
            "int8": out / f"{run_dir.name}-int8.onnx"}


def test_export_writes_model_and_json_and_nothing_else(exported, run_dir):
    names = sorted(p.name for p in exported["out"].iterdir())
    stem = run_dir.name
    assert names == sorted([f"{stem}.onnx", f"{stem}.json", f"{stem}-int8.onnx", f"{stem}-int8.json"])
    saved = json.loads((exported["out"] / f"{stem}.json").read_text())
    assert saved["exporter"] == "dynamo" and saved["fallback_reason"] is None
    assert saved["file_size_bytes"] == exported["fp32"].stat().st_size
    assert saved["run_dir"] == str(run_dir.resolve())
    assert [b["batch_size"] for b in saved["validation"]["batches"]] == [1, 3, 8]


def test_checker_passes_and_batch_axis_is_dynamic(exported):
    onnx.checker.check_model(str(exported["fp32"]), full_check=True)
    model = onnx.load(str(exported["fp32"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 16, 16]
    # the evaluation network only: its output is the logits of the 10 classes, one output
    assert len(model.graph.output) == 1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnxruntime_matches_pytorch_on_test_images(exported, run_dir, batch):
    model, _, recipe = load_run_model(run_dir, "best")
    data = build_data(recipe.data)
    x, _ = next(iter(data.test_batches(batch, torch.device("cpu"))))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(exported["fp32"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()
    figures = {b["batch_size"]: b for b in exported["record"]["validation"]["batches"]}[batch]
    assert figures["max_abs_diff"] <= 1e-4 and figures["top1_agreement"] == 1.0


def test_metadata_round_trips(exported, run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    data = build_data(load_run_model(run_dir)[2].data)
    meta = read_metadata(exported["fp32"])
    assert meta["method"] == "ipasd" and meta["arch"] == "resnet8" and meta["dataset"] == "digits"
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["input_size"] == [3, 16, 16]
    assert meta["mean"] == pytest.approx(list(data.mean)) and meta["std"] == pytest.approx(list(data.std))
    assert meta["test_top1"] == pytest.approx(summary["best_top1"])
    # what a deployer sees through onnxruntime alone: the same strings
    raw = ort.InferenceSession(str(exported["fp32"]), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(raw.custom_metadata_map["class_names"]) == meta["class_names"]
    assert json.loads(raw.custom_metadata_map["mean"]) == meta["mean"]
    saved = json.loads(exported["fp32"].with_suffix(".json").read_text())
    for key in ("method", "arch", "dataset", "class_names", "input_size", "mean", "std", "test_top1"):
        assert saved[key] == meta[key], key


def test_model_proto_says_what_the_model_is_without_a_local_path(exported, run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    model = onnx.load(str(exported["fp32"]))
    assert model.model_version == state["global_step"] > 0
    for word in ("ipasd", "resnet8", "digits", f"{summary['best_top1']:.2f}%", run_dir.name):
        assert word in model.doc_string, word
    meta = read_metadata(exported["fp32"])
    assert meta["source_run"] == run_dir.name  # the run's name, no absolute path of the exporting machine
    assert os.sep not in meta["source_run"]
    int8 = onnx.load(str(exported["int8"]))
    assert int8.model_version == model.model_version and "int8" in int8.doc_string
    assert f"{read_metadata(exported['int8'])['test_top1']:.2f}%" in int8.doc_string


def test_bench_finds_the_pytorch_run_through_the_export_json(exported, tmp_path):
    rows, _ = bench(exported["fp32"], [1], threads=1, runs=2, warmup=0, out=tmp_path)
    assert "pytorch" in set(rows["backend"])  # no --torch: the json's run_dir, not metadata's source_run


def test_evaluate_onnx_equals_pytorch_evaluation(exported, run_dir):
    model, _, recipe = load_run_model(run_dir)
    data = build_data(recipe.data)
    reference = evaluate(model, data, torch.device("cpu"), torch.float32, 64)
    result = evaluate_onnx(exported["fp32"], None, batch_size=50)  # 359 images: a short last batch
    assert result["n"] == data.num_test == 359
    # fp32 ORT and PyTorch agree within 1e-4: at most a near-tie could flip one image
    assert abs(result["top1"] - reference["test_top1"]) <= 100 / 359 + 1e-9
    assert abs(result["top5"] - reference["test_top5"]) <= 100 / 359 + 1e-9


def test_int8_is_static_qdq_per_channel_and_reports_both_accuracies(exported):
    record = exported["record"]
    int8_json = json.loads(exported["int8"].with_suffix(".json").read_text())
    assert int8_json["precision"] == "int8" and int8_json["quantization"]["calibration_samples"] == 32
    model = onnx.load(str(exported["int8"]))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # per-channel: the first conv's weight (16 output channels) dequantizes with 16 scales along axis 0
    inits = {i.name: i for i in model.graph.initializer}
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in model.graph.node if n.output[0] == first_conv.input[1])
    assert weight_dq.op_type == "DequantizeLinear"
    assert list(inits[weight_dq.input[1]].dims) == [16]
    # both accuracies, each equal to an independent evaluation of its model on the whole test set
    fp32_eval = evaluate_onnx(exported["fp32"], None)
    int8_eval = evaluate_onnx(exported["int8"], None)
    assert record["onnx_test"]["top1"] == pytest.approx(fp32_eval["top1"])
    assert record["int8"]["test_top1"] == pytest.approx(int8_eval["top1"])
    assert int8_json["fp32_onnx_test"]["top1"] == pytest.approx(fp32_eval["top1"])
    assert read_metadata(exported["int8"])["test_top1"] == pytest.approx(int8_eval["top1"])
    assert int8_json["file_size_bytes"] < record["file_size_bytes"] / 2  # int8 weights


def test_validation_fails_loudly_on_a_mismatch(exported, run_dir):
    model, _, recipe = load_run_model(run_dir)
    images = next(iter(build_data(recipe.data).test_batches(8, torch.device("cpu"))))[0].numpy()
    assert validate_against_torch(model, exported["fp32"], images, (1, 3))  # the true model passes
    with torch.no_grad():
        model.classifier.bias.add_(1e-3)  # 10x atol: must fail
    with pytest.raises(ExportValidationError, match="differs from PyTorch at batch 1"):
        validate_against_torch(model, exported["fp32"], images, (1, 3))


def test_compare_outputs_tolerance_is_atol_plus_rtol_times_reference():
    reference = np.array([[0.0, 10.0]])
    ok = compare_outputs(reference, reference + np.array([[0.9e-4, 10.05e-3]]))  # bounds 1e-4 and 1e-4 + 1e-2
    assert ok["within_tolerance"] and ok["max_abs_diff"] == pytest.approx(10.05e-3)
    assert not compare_outputs(reference, reference + np.array([[1.1e-4, 0.0]]))["within_tolerance"]
    assert not compare_outputs(reference, reference + np.array([[0.0, 10.2e-3]]))["within_tolerance"]
    assert compare_outputs(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [2.0, 1.0]]))["top1_agreement"] == 0.5


def _failing_dynamo(monkeypatch):
    real_export = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


def test_falls_back_to_torchscript_exporter_and_records_it(run_dir, tmp_path, monkeypatch):
    _failing_dynamo(monkeypatch)
    record = export_onnx(run_dir, tmp_path, validation_batch_sizes=(1, 3))
    saved = json.loads((tmp_path / f"{run_dir.name}.json").read_text())
    assert saved["exporter"] == "torchscript" == record["exporter"]
    assert "simulated dynamo failure" in saved["fallback_reason"]
    assert read_metadata(tmp_path / f"{run_dir.name}.onnx")["exporter"] == "torchscript"


def test_failed_validation_leaves_nothing_behind(run_dir, tmp_path, monkeypatch):
    import ipasdctl.deploy.formats.onnx_fp32 as export_module

    _failing_dynamo(monkeypatch)  # the TorchScript exporter is the quicker one
    real_export_model = export_module.export_model

    def export_then_drift(model, *args, **kwargs):
        info = real_export_model(model, *args, **kwargs)
        with torch.no_grad():
            model.classifier.bias.add_(1.0)  # PyTorch no longer matches the file written
        return info

    monkeypatch.setattr(export_module, "export_model", export_then_drift)
    with pytest.raises(ExportValidationError):
        export_onnx(run_dir, tmp_path / "out", validation_batch_sizes=(1, 3))
    assert list((tmp_path / "out").iterdir()) == []  # not even the staging folder


# ----------------------------------------------------------------------------------------------- bench


def test_summarize_percentiles_on_known_times():
    times = np.arange(1, 101, dtype=np.float64)  # 1..100 ms
    stats = summarize(times, batch_size=4)
    # linear interpolation between order statistics at (n - 1) * q: 49.5 -> 50.5, 89.1 -> 90.1, 98.01 -> 99.01
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)


def test_throughput_follows_the_median_and_a_long_tail_is_reported_as_unstable():
    calm = np.ones(100)  # 1 ms each
    busy = np.r_[np.ones(97), [40.0, 60.0, 80.0]]  # three calls a busy machine slowed down
    stats = summarize(busy, batch_size=8)
    assert stats["throughput_ips"] == pytest.approx(8000.0)  # 8 images per 1 ms median, whatever the tail
    assert stats["mean_ms"] > 2.0  # the mean would have halved it
    rows = pd.DataFrame([{"backend": "onnxruntime", "provider": "CPUExecutionProvider", "batch_size": b,
                          **summarize(times, b)} for b, times in ((1, calm), (8, busy))])
    warnings = unstable_rows(rows)
    assert len(warnings) == 1 and "batch 8" in warnings[0] and "--runs" in warnings[0] and "--threads" in warnings[0]


def test_parse_batch_sizes():
    assert parse_batch_sizes("1, 8,64") == [1, 8, 64]
    for bad in ("1,x", "0,2", ""):
        with pytest.raises(UserError):
            parse_batch_sizes(bad)


def test_bench_writes_latency_csv_with_percentiles(exported, run_dir, tmp_path):
    rows, csv_path = bench(exported["fp32"], [1, 2], threads=1, runs=4, warmup=1, torch_run=run_dir, out=tmp_path)
    assert csv_path == tmp_path / "latency.csv"
    table = pd.read_csv(csv_path)
    assert {"p50_ms", "p90_ms", "p99_ms", "throughput_ips", "threads", "cpu_model", "batch_size"} <= set(table.columns)
    expected = {("onnxruntime", "CPUExecutionProvider"), ("pytorch", "cpu")}
    if torch.cuda.is_available():
        expected.add(("pytorch", "cuda"))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        expected.add(("onnxruntime", "CUDAExecutionProvider"))
    assert sorted(zip(table["backend"], table["provider"], table["batch_size"])) == sorted(
        (backend, provider, b) for backend, provider in expected for b in (1, 2))
    assert (table["p50_ms"] <= table["p90_ms"]).all() and (table["p90_ms"] <= table["p99_ms"]).all()
    assert (table["threads"] == 1).all() and (table["runs"] == 4).all()
    assert np.allclose(table["throughput_ips"], table["batch_size"] * 1000 / table["p50_ms"], rtol=1e-4)
    # another model's rows are kept; a second bench of the same model replaces its own rows
    bench(exported["int8"], [1], threads=1, runs=2, warmup=0, out=tmp_path, with_torch=False)
    bench(exported["fp32"], [4], threads=1, runs=2, warmup=0, out=tmp_path, with_torch=False)
    table = pd.read_csv(csv_path)
    table = table[table["provider"] == "CPUExecutionProvider"]
    assert sorted(zip(table["model"], table["batch_size"])) == sorted([(exported["int8"].name, 1),
                                                                       (exported["fp32"].name, 4)])
    assert set(table["precision"]) == {"fp32", "int8"}


def test_bench_cli_prints_table_and_writes_csv_beside_the_model(exported, capsys, tmp_path):
    import shutil

    model = tmp_path / exported["int8"].name
    shutil.copy(exported["int8"], model)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", str(model), "--runs", "3", "--batch-sizes", "1,2", "--no-torch", "--threads", "1"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "p50_ms" in out and "p99_ms" in out and out.strip().splitlines()[-1] == str(tmp_path / "latency.csv")
    # the table once, on stdout; stderr has the progress (and warnings of unstable rows), no table rows
    assert len(out.strip().splitlines()) == 1 + 1 + 2 + 1  # header line, column names, 2 rows, the csv path
    assert captured.err and all(line.startswith(("timing ", "warning: ")) for line in captured.err.strip().splitlines())
    table = pd.read_csv(tmp_path / "latency.csv")
    assert sorted(table.loc[table["provider"] == "CPUExecutionProvider", "batch_size"]) == [1, 2]
    assert set(table["backend"]) == {"onnxruntime"}  # --no-torch


def test_bench_of_a_folder_times_every_model_in_it_once_and_an_empty_folder_is_one_line(exported, capsys, tmp_path):
    import shutil

    folder = tmp_path / "models"
    folder.mkdir()
    for key in ("fp32", "int8"):
        shutil.copy(exported[key], folder / exported[key].name)
        shutil.copy(exported[key].with_suffix(".json"), folder / exported[key].with_suffix(".json").name)
    args = ["--runs", "2", "--batch-sizes", "1", "--no-torch", "--threads", "1", "-q"]
    with pytest.raises(SystemExit) as exit_info:  # the folder, and one of its models again: timed once
        cli.main(["bench", str(folder), str(folder / exported["fp32"].name), *args])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.endswith("runs per size")] == \
        sorted([exported["fp32"].name, exported["int8"].name])
    table = pd.read_csv(folder / "latency.csv")
    assert sorted(table["model"]) == sorted([exported["fp32"].name, exported["int8"].name])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", str(tmp_path / "empty"), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "holds no .onnx model" in err


def test_bench_of_int8_names_pytorch_rows_after_the_run_shows_the_fp32_latency_and_times_eager_once(
        exported, run_dir, tmp_path, capsys, monkeypatch):
    _failing_dynamo(monkeypatch)
    out = tmp_path / "exports"
    code = _exit_code(["export", str(run_dir), "--int8", "--calib-samples", "16", "--out", str(out), "-q",
                       "bench", "--runs", "2", "--warmup", "0", "--batch-sizes", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    table = pd.read_csv(out / "latency.csv")
    eager = table[table["backend"] == "pytorch"]
    # once for the run (not once per exported precision), named after its checkpoint, which is fp32
    assert list(eager["model"]) == [f"{run_dir.name}/checkpoints/best.pt"] and list(eager["precision"]) == ["fp32"]
    assert eager["model_path"].item() == str((run_dir / "checkpoints" / "best.pt").resolve())
    int8 = table[(table["backend"] == "onnxruntime") & (table["precision"] == "int8")]
    assert int8["model"].tolist() == [f"{run_dir.name}-int8.onnx"]
    assert int8["fp32_p50_ms"].item() > 0
    ratio = int8["fp32_p50_ms"].item() / int8["p50_ms"].item()
    assert int8["int8_vs_fp32"].item() == pytest.approx(ratio, rel=1e-3)  # latency.csv rounds its figures
    int8_table = printed.split(f"{run_dir.name}-int8.onnx: ")[1]
    assert "fp32_p50_ms" in int8_table.splitlines()[1] and "precision" in int8_table.splitlines()[1]


def test_a_rerun_measures_again_what_was_flagged_unstable(exported, tmp_path):
    rows, csv_path = bench(exported["fp32"], [1], threads=1, runs=3, warmup=0, out=tmp_path, with_torch=False)
    kept, _ = bench(exported["fp32"], [1], threads=1, runs=3, warmup=0, out=tmp_path, with_torch=False,
                    skip_measured=True)
    assert kept.attrs.get("skipped") and kept["p50_ms"].tolist() == pytest.approx(rows["p50_ms"].tolist())
    table = pd.read_csv(csv_path)
    table["p99_ms"] = 100 * table["p50_ms"]  # as a busy machine leaves it: flagged unstable
    table.to_csv(csv_path, index=False)
    assert unstable_rows(table)
    again, _ = bench(exported["fp32"], [1], threads=1, runs=3, warmup=0, out=tmp_path, with_torch=False,
                     skip_measured=True)
    assert not again.attrs.get("skipped")
    assert pd.read_csv(csv_path)["p99_ms"].item() == pytest.approx(again["p99_ms"].item(), rel=1e-3)


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


# ----------------------------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_run_folder_without_checkpoint(run_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = _one_line_error(capsys, ["export", str(tmp_path / "run"), "--onnx", "--out", str(tmp_path / "x")])
    assert "is not a run folder (no config.yaml in it)" in err
    (tmp_path / "run" / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    err = _one_line_error(capsys, ["export", str(tmp_path / "run"), "--onnx", "--out", str(tmp_path / "x")])
    assert "checkpoints/best.pt" in err
    assert not (tmp_path / "x").exists()


def test_a_missing_folder_says_it_does_not_exist(exported, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    for argv in (["export", str(missing), "--onnx", "--out", str(tmp_path / "x")],
                 ["bench", str(exported["fp32"]), "--torch", str(missing), "--runs", "1", "--out", str(tmp_path)]):
        err = _one_line_error(capsys, argv)
        assert f"{missing} does not exist" in err, err
        assert "checkpoints" not in err
    with pytest.raises(UserError, match="does not exist"):
        export_onnx(missing, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "latency.csv").exists()


def test_unwritable_out(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = _one_line_error(capsys, ["export", str(run_dir), "--onnx", "--out", str(blocker / "exports")])
    assert "--out" in err


def test_export_defaults_to_onnx_and_quiet_prints_only_the_path(run_dir, tmp_path, capsys, monkeypatch):
    _failing_dynamo(monkeypatch)  # the TorchScript exporter is the quicker one
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(run_dir), "--out", str(tmp_path), "-q"])  # no --onnx: ONNX is the default
    captured = capsys.readouterr()
    assert exit_info.value.code == 0 and captured.err == ""
    assert captured.out.splitlines() == [str(tmp_path / f"{run_dir.name}.onnx")]


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", bytes(range(256)) * 4])
def test_file_that_is_not_onnx(tmp_path, capsys, content):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(content)
    assert "not an ONNX model" in _one_line_error(capsys, ["bench", str(fake), "--runs", "1", "--no-torch"])
    with pytest.raises(UserError, match="not an ONNX model"):
        evaluate_onnx(fake, None)
    assert not (tmp_path / "latency.csv").exists()


def test_missing_model_file(tmp_path, capsys):
    assert "does not exist" in _one_line_error(capsys, ["bench", str(tmp_path / "nope.onnx")])


def test_too_large_for_one_file_goes_to_one_external_data_file(run_dir, tmp_path, monkeypatch):
    from ipasdctl.deploy import onnx_files

    _failing_dynamo(monkeypatch)
    monkeypatch.setattr(onnx_files, "SINGLE_FILE_LIMIT_BYTES", 1000)  # resnet8's 300 kB count as "too large"
    record = export_onnx(run_dir, tmp_path, validation_batch_sizes=(1, 3))
    stem = run_dir.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}.onnx", f"{stem}.onnx.data", f"{stem}.json"])
    model, _, _ = load_run_model(run_dir)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    data_bytes = (tmp_path / f"{stem}.onnx.data").stat().st_size
    assert 0.8 * weight_bytes < data_bytes < 1.2 * weight_bytes  # the weights once (BN may be folded), not twice
    assert record["file_size_bytes"] == data_bytes + (tmp_path / f"{stem}.onnx").stat().st_size
    assert record["validation"]["batches"][-1]["max_abs_diff"] <= 1e-4
