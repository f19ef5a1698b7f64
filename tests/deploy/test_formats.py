"""Export formats: `--format` with each registered format round-trips through eval, bench and predict; fp16
agrees with PyTorch at its stated tolerance with float32 inputs and outputs, BatchNorm folded first and what
cannot fold kept float32; bench's one line when fp16 is slower than fp32 and `--provider cuda` without
onnxruntime-gpu; a format defined in the test is registered, exported, listed and run by eval/bench/predict.

The shared demo run (resnet8, 1 epoch on 64 digits) is exported once in every format for the module. No timing
is asserted: where a verdict needs timings, the clock is replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ipasdctl.analysis.evaluation import eval_onnx_model
from ipasdctl.data import build_data
from ipasdctl.deploy import onnx_test_accuracy, read_metadata
from ipasdctl.deploy.bench import bench
from ipasdctl.deploy.export import check_export_options, export_onnx
from ipasdctl.deploy.export_names import model_files
from ipasdctl.deploy.formats import FORMATS, ExportFormat, Written, export_plan
from ipasdctl.deploy.formats.onnx_fp16 import FP16_ATOL, FP16_RTOL, convert_to_fp16
from ipasdctl.deploy.predict import predict
from ipasdctl.deploy.validation import ExportValidationError
from ipasdctl.errors import UserError
from ipasdctl.runs import load_model
from tests.helpers import cli_error, run_cli

FORMAT_NAMES = ("onnx", "onnx-int8", "onnx-fp16")


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("formats")
    record = export_onnx(demo_run, out, formats=list(FORMAT_NAMES), calib_samples=16, validation_batch_sizes=(1, 3))
    return {"out": out, "record": record, "run": demo_run,
            **{name: Path(path) for name, path in record["exported"].items()}}


def _digit_png(run_dir: Path, path: Path) -> Path:
    """A test digit as a PNG, at the model's input size (what a user hands to predict)."""
    from PIL import Image

    data = build_data(load_model(run_dir)[2].data)
    x, _ = next(iter(data.test_batches(1, torch.device("cpu"))))
    pixels = (x[0] * torch.tensor(data.std).view(-1, 1, 1) + torch.tensor(data.mean).view(-1, 1, 1)) * 255
    Image.fromarray(pixels.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_each_format_round_trips_through_eval_bench_and_predict(exported, fmt, tmp_path):
    path = exported[fmt]
    record = json.loads(path.with_suffix(".json").read_text())
    precision = FORMATS.get(fmt).precision
    assert record["export_format"] == fmt and record["precision"] == precision
    assert read_metadata(path)["export_format"] == fmt and read_metadata(path)["precision"] == precision
    # eval: the figure the record states is the one eval measures
    result = eval_onnx_model(path, batch_size=100)
    assert result["top1"] == pytest.approx(record["onnx_test"]["top1"]) and result["precision"] == precision
    # bench: the model's own rows; a derived format is timed against its fp32 original beside it
    rows, _ = bench(path, [1], threads=1, runs=2, warmup=0, out=tmp_path, with_torch=False, provider="cpu")
    assert list(rows["precision"]) == [precision] and list(rows["provider"]) == ["CPUExecutionProvider"]
    assert rows["fp32_p50_ms"].notna().all() == (fmt != "onnx")
    # predict: a digit image through the file, as close to the fp32 file's answer as the format promises
    image = _digit_png(exported["run"], tmp_path / "digit.png")
    got, fp32 = predict(path, [image], top_k=3)[0], predict(exported["onnx"], [image], top_k=3)[0]
    assert got.classes[0] == fp32.classes[0]
    if fmt == "onnx-fp16":
        assert got.probabilities == pytest.approx(fp32.probabilities, abs=1e-2)


def test_the_fp32_record_names_each_format_beside_it(exported):
    main = json.loads(exported["onnx"].with_suffix(".json").read_text())
    assert main["formats"] == list(FORMAT_NAMES)
    assert main["int8_options"] == {"int8": True, "calib_samples": 16, "int8_target": "auto"}  # the key kept
    for fmt, key in (("onnx-int8", "int8"), ("onnx-fp16", "fp16")):
        own = json.loads(exported[fmt].with_suffix(".json").read_text())
        assert main[key]["format"] == fmt and main[key]["onnx_file"] == exported[fmt].name
        assert main[key]["test_top1"] == own["onnx_test"]["top1"] == pytest.approx(onnx_test_accuracy(exported[fmt], None)["top1"])
        assert own["fp32_onnx_test"] == main["onnx_test"] and own["fp32_onnx_file"] == exported["onnx"].name
    assert {"pays", "speed_check", "target", "quantization"} <= set(main["int8"])  # INT8's keys as before
    written = sorted(p.name for p in exported["out"].iterdir() if ".eval." not in p.name and p.suffix in (".onnx", ".json"))
    assert written == sorted([exported[f].name for f in FORMAT_NAMES]
                             + [exported[f].with_suffix(".json").name for f in FORMAT_NAMES])


def test_fp16_agrees_with_pytorch_at_its_tolerance_with_float32_inputs_and_outputs(exported):
    model = onnx.load(str(exported["onnx-fp16"]))
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [TensorProto.FLOAT] * 2
    inits = {i.name: i for i in model.graph.initializer}
    conv_weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w.data_type == TensorProto.FLOAT16 for w in conv_weights)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]  # each folded into its conv
    record = json.loads(exported["onnx-fp16"].with_suffix(".json").read_text())
    assert (record["validation"]["atol"], record["validation"]["rtol"]) == (FP16_ATOL, FP16_RTOL) == (1e-2, 1e-2)
    conversion = record["fp16_conversion"]
    assert conversion["keep_io_types"] and conversion["batchnorm_left_float"] == 0 and conversion["batchnorm_folded"] > 0
    # an independent check on the whole test set: float32 in, float32 out, within atol + rtol * |torch|
    torch_model, _, recipe = load_model(exported["run"])
    x = torch.cat([x for x, _ in build_data(recipe.data).test_batches(128, torch.device("cpu"))])
    with torch.no_grad():
        expected = torch_model(x).numpy()
    session = ort.InferenceSession(str(exported["onnx-fp16"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=FP16_ATOL, rtol=FP16_RTOL)
    assert np.abs(got - expected).max() > 1e-6  # it really computes in float16 (not fp32 under another name)


def test_fp16_validation_fails_past_its_tolerance(exported):
    from ipasdctl.deploy.formats import ExportJob, ExportOptions, get_format

    torch_model, _, recipe = load_model(exported["run"])
    images = next(iter(build_data(recipe.data).test_batches(8, torch.device("cpu"))))[0].numpy()
    job = ExportJob(torch_model, None, images, ExportOptions(validation_batch_sizes=(1, 3)), exported["out"])
    assert get_format("onnx-fp16").validate(job, exported["onnx-fp16"])["batches"]  # the true model passes
    with torch.no_grad():
        torch_model.classifier.bias.add_(0.05)  # 5x atol
    with pytest.raises(ExportValidationError, match="atol 0.01 / rtol 0.01"):
        get_format("onnx-fp16").validate(job, exported["onnx-fp16"])


def _batchnorm_graph(path: Path) -> Path:
    """images -> BatchNorm (nothing before it to fold into) -> Conv -> BatchNorm (folds into the Conv) -> logits."""
    rng = np.random.default_rng(0)

    def bn(name, channels):
        return [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in
                (("scale", rng.uniform(0.5, 2, channels)), ("bias", rng.normal(0, 1, channels)),
                 ("mean", rng.normal(0, 1, channels)), ("var", rng.uniform(1e-3, 2, channels)))]

    inits = bn("bn0", 3) + bn("bn1", 4) + [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("BatchNormalization", ["images", "bn0.scale", "bn0.bias", "bn0.mean", "bn0.var"], ["a"]),
             helper.make_node("Conv", ["a", "w"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["b", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["logits"])]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_batchnorm_that_cannot_fold_stays_float32_and_the_other_folds(tmp_path):
    fp32 = _batchnorm_graph(tmp_path / "bn.onnx")
    conversion = convert_to_fp16(fp32, tmp_path / "bn-fp16.onnx", tmp_path, batchnorm_layers=2)
    assert (conversion["batchnorm_folded"], conversion["batchnorm_left_float"]) == (1, 1)
    model = onnx.load(str(tmp_path / "bn-fp16.onnx"))
    onnx.checker.check_model(model, full_check=True)  # sorted: every input made before it is used
    inits = {i.name: i for i in model.graph.initializer}
    (left,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert all(inits[i].data_type == TensorProto.FLOAT for i in left.input[1:])  # its statistics in float32
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    assert inits[conv.input[1]].data_type == TensorProto.FLOAT16
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
           for p in (fp32, tmp_path / "bn-fp16.onnx")}
    np.testing.assert_allclose(run[tmp_path / "bn-fp16.onnx"], run[fp32], atol=FP16_ATOL, rtol=FP16_RTOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn-fp16.onnx", "bn.onnx"]  # the folded copy is gone


# ----------------------------------------------------------------------------------------------- the options


def test_format_takes_one_or_several_and_the_aliases_add_theirs(tmp_path, capsys):
    def plan(**kwargs):
        args = {"opset": None, "int8": False, "calib_samples": 8, "checkpoint": "best", **kwargs}
        return [f.name for f in check_export_options(**args)]

    assert plan() == ["onnx"] and plan(int8=True) == ["onnx", "onnx-int8"]
    assert plan(formats="onnx-fp16") == ["onnx", "onnx-fp16"]  # the fp32 file it is made from comes first
    assert plan(formats="onnx-fp16,onnx-int8", int8=True) == ["onnx", "onnx-fp16", "onnx-int8"]
    assert plan(formats="onnx-int8", int8_target="arm64") == ["onnx", "onnx-int8"]  # no --int8 needed then
    with pytest.raises(UserError, match="needs --int8"):
        plan(formats="onnx-fp16", int8_target="arm64")
    with pytest.raises(UserError, match="--int8 needs --opset 13"):
        plan(formats="onnx,onnx-int8", opset=12)
    err = cli_error(["export", str(tmp_path), "--format", "onnx,onnx-fp61", "--out", str(tmp_path / "x")], capsys)
    assert "unknown export format 'onnx-fp61' (did you mean 'onnx-fp16'?)" in err and "known: onnx, onnx-fp16" in err
    assert not (tmp_path / "x").exists()


def test_a_rerun_keeps_an_export_only_in_every_format_asked_for(exported):
    from ipasdctl.deploy.export import _unchanged_export

    main = json.loads(exported["onnx"].with_suffix(".json").read_text())
    name, sha = exported["onnx"].stem, main["source_checkpoint_sha256"]
    settings = {"onnx": {}, "onnx-fp16": {}, "onnx-int8": {"int8": True, "calib_samples": 16, "int8_target": "auto"}}

    def kept(names, **changed):
        return _unchanged_export(exported["out"], name, export_plan(names), sha, None, {**settings, **changed}, None)

    record = kept(["onnx-fp16"])
    assert record["skipped"] and set(record["exported"]) == {"onnx", "onnx-fp16"}
    assert "fp16" in record and "int8" not in record  # not asked for this time
    assert kept(["onnx-int8"], **{"onnx-int8": {**settings["onnx-int8"], "calib_samples": 32}}) is None


# ----------------------------------------------------------------------------------------------- bench


def test_bench_says_in_one_line_when_fp16_is_slower_than_fp32(exported, tmp_path, capsys, monkeypatch):
    import importlib

    bench_module = importlib.import_module("ipasdctl.deploy.bench")  # the package's `bench` is the function
    model = tmp_path / exported["onnx-fp16"].name
    for source in (exported["onnx-fp16"], exported["onnx"]):
        shutil.copy(source, tmp_path / source.name)
        shutil.copy(source.with_suffix(".json"), tmp_path / source.with_suffix(".json").name)
    calls = []

    def clock(fp16_ms, fp32_ms):
        def time_calls(call, runs, warmup):  # bench times the model, then its fp32 original, per batch size
            calls.append(None)
            return np.full(runs, fp16_ms if len(calls) % 2 else fp32_ms)
        return time_calls

    argv = ["bench", str(model), "--batch-sizes", "1,2", "--runs", "3", "--no-torch", "--provider", "cpu",
            "--out", str(tmp_path / "t")]
    monkeypatch.setattr(bench_module, "time_calls", clock(2.0, 1.0))
    code, out, _ = run_cli(argv, capsys)
    lines = [line for line in out.splitlines() if "slower than fp32" in line]
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith("fp16 is slower than fp32 on this CPU at batch 1, 2 (p50 2.000 ms against 1.000 ms")
    assert "CPU provider runs few operators in float16" in lines[0] and "fp16_pays" in out
    table = pd.read_csv(tmp_path / "t" / "latency.csv")
    assert list(table["speedup_vs_fp32"]) == [0.5, 0.5] and not table["faster_than_fp32"].any()
    monkeypatch.setattr(bench_module, "time_calls", clock(1.0, 2.0))
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "slower than fp32" not in out


def test_provider_cuda_without_onnxruntime_gpu_is_one_line(exported, tmp_path, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    for provider in ("cuda", "tensorrt"):
        err = cli_error(["bench", str(exported["onnx-fp16"]), "--provider", provider, "--out", str(tmp_path)], capsys)
        assert f"--provider {provider} needs onnxruntime's" in err and "install onnxruntime-gpu" in err
    assert "did you mean 'cuda'" in cli_error(["bench", str(exported["onnx"]), "--provider", "cdua"], capsys)
    # in a chain: before the export runs
    err = cli_error(["export", str(exported["run"]), "--out", str(tmp_path / "x"), "bench", "--provider", "cuda"], capsys)
    assert "onnxruntime-gpu" in err and not (tmp_path / "x").exists() and not (tmp_path / "latency.csv").exists()


def test_a_model_of_an_unknown_format_is_one_line(tmp_path, capsys):
    from tests.helpers import DIGITS, tiny_onnx

    model = tiny_onnx(tmp_path / "m.onnx", {**DIGITS, "export_format": "onnx-tflite"})
    for argv in (["bench", model, "--runs", "1", "--no-torch"], ["predict", model, str(tmp_path)]):
        err = cli_error(argv, capsys)
        assert "was exported in format 'onnx-tflite', which this ipasdctl does not know" in err
        assert "known: onnx, onnx-fp16, onnx-int8" in err
    assert not (tmp_path / "latency.csv").exists()


# ----------------------------------------------------------------------------------------------- a new format


class StubFormat(ExportFormat):
    """The fp32 file under another name: what a format must supply to be exported, listed, evaluated, benched
    and predicted with, and nothing else."""

    name = "onnx-stub"
    suffix = "-stub"
    precision = "stub"
    made_from = "onnx"
    summary_line = "the fp32 file, copied (a test's format)"
    tolerance = "against the fp32 file: the same bytes"
    opened: list = []  # the files its session was opened on

    def export(self, job, path):
        shutil.copy(job.source_of(self).path, path)
        return Written(metadata={"stub": "copied"}, record={"stub_note": "copied from fp32"})

    def validate(self, job, path):
        return {"reference": job.source_of(self).path.name, "batches": []}

    def session(self, path, threads=None, provider="cpu"):
        StubFormat.opened.append(Path(path).name)
        return super().session(path, threads, provider)


@pytest.fixture
def stub_format():
    FORMATS.register(StubFormat)
    StubFormat.opened.clear()
    yield StubFormat
    FORMATS.unregister(StubFormat.name)


def test_a_new_format_is_one_class_registered_exported_listed_and_run(stub_format, demo_run, tmp_path, capsys,
                                                                      monkeypatch):
    from ipasdctl.cli import listing

    monkeypatch.setenv(listing.CACHE_ENV, str(tmp_path / "cache"))  # a cold cache: the names of this process
    code, out, _ = run_cli(["list", "formats"], capsys)
    assert code == 0 and any(line.startswith("onnx-stub") and "NAME-stub.onnx" in line for line in out.splitlines())
    out_dir = tmp_path / "exports"
    code, out, _ = run_cli(["export", str(demo_run), "--format", "onnx-stub", "--out", str(out_dir), "-q"], capsys)
    stem = demo_run.name
    stub = out_dir / f"{stem}-stub.onnx"
    assert code == 0 and out.splitlines() == [str(stub), str(out_dir / f"{stem}.onnx")]
    record = json.loads(stub.with_suffix(".json").read_text())
    assert (record["export_format"], record["precision"], record["stub_note"]) == ("onnx-stub", "stub", "copied from fp32")
    assert read_metadata(stub)["stub"] == "copied" and read_metadata(stub)["export_format"] == "onnx-stub"
    assert json.loads((out_dir / f"{stem}.json").read_text())["stub"]["format"] == "onnx-stub"
    assert stub in model_files(out_dir, stem)  # replaced with the rest of the name's files
    opened = len(StubFormat.opened)  # once at export, for its test top-1
    assert opened == 1 and record["onnx_test"]["top1"] == pytest.approx(
        json.loads((out_dir / f"{stem}.json").read_text())["onnx_test"]["top1"])
    code, _, _ = run_cli(["eval", str(stub), "-q"], capsys)
    assert code == 0 and len(StubFormat.opened) == opened + 1
    code, out, _ = run_cli(["bench", str(stub), "--runs", "2", "--batch-sizes", "1", "--no-torch", "-q"], capsys)
    assert code == 0 and len(StubFormat.opened) == opened + 2 and "stub_pays" in out
    code, _, _ = run_cli(["predict", str(stub), str(_digit_png(demo_run, tmp_path / "d.png"))], capsys)
    assert code == 0 and len(StubFormat.opened) == opened + 3
