"""INT8 for the CPU it runs on: the settings chosen per target, the operators quantised, BatchNorm that
cannot fold left float, the settings in the metadata, agreement with fp32, and the "does INT8 pay" verdict
in export and bench. Tiny runs on the bundled digits; no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from ipasdctl import cli
from ipasdctl.config import load_recipe
from ipasdctl.data import build_data
from ipasdctl.deploy import read_metadata
from ipasdctl.deploy.bench import bench, int8_verdict
from ipasdctl.deploy.export import export_onnx
from ipasdctl.deploy.int8 import COMPUTE_OPS, TARGETS, choose_settings, detect_target
from ipasdctl.errors import UserError
from ipasdctl.training import Progress, train

QUANTISED_CONSUMERS = set(COMPUTE_OPS) | {"Add"}  # Relu/Clip after a quantised op vanish into its Quantize


def _trained_and_exported(tmp_path_factory, arch: str, epochs: int, subset: int, target: str, calib: int) -> dict:
    recipe = load_recipe("demo", {"model": {"arch": arch}, "train": {"epochs": epochs},
                                  "data": {"train_subset": subset}})
    run_dir = train(recipe, tmp_path_factory.mktemp(f"runs-{arch}"), progress=Progress(enabled=False))
    out = tmp_path_factory.mktemp(f"exports-{arch}")
    record = export_onnx(run_dir, out, int8=True, int8_target=target, calib_samples=calib,
                         validation_batch_sizes=(1, 8))
    return {"run": run_dir, "out": out, "record": record, "fp32": out / f"{run_dir.name}.onnx",
            "int8": out / f"{run_dir.name}-int8.onnx"}


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory) -> dict:
    """Trained long enough (8 epochs on 1,024 digits) that agreeing with fp32 means something."""
    return _trained_and_exported(tmp_path_factory, "resnet8", 8, 1024, "avx2", 64)


@pytest.fixture(scope="module")
def preact(tmp_path_factory) -> dict:
    return _trained_and_exported(tmp_path_factory, "preact_resnet18", 1, 64, "avx512-vnni", 32)


# ----------------------------------------------------------------------------------------------- the chooser


def test_settings_per_target_follow_onnxruntime_guidance():
    avx2 = choose_settings("avx2")
    assert (avx2.activation_type, avx2.weight_type, avx2.reduce_range) == ("QUInt8", "QInt8", True)
    vnni = choose_settings("avx512-vnni")
    assert (vnni.activation_type, vnni.weight_type, vnni.reduce_range) == ("QUInt8", "QInt8", False)
    arm = choose_settings("arm64")
    assert (arm.activation_type, arm.weight_type, arm.reduce_range) == ("QInt8", "QInt8", False)
    for settings in (avx2, vnni, arm):
        assert settings.per_channel and settings.quant_format == "QDQ"
        assert set(COMPUTE_OPS) <= set(settings.op_types) and "BatchNormalization" not in settings.op_types
    assert [avx2.short, vnni.short, arm.short] == ["U8S8", "U8S8", "S8S8"]


@pytest.mark.parametrize("machine, flags, target", [
    ("x86_64", {"fpu", "sse2", "avx", "avx2", "fma"}, "avx2"),                      # the AVX2-only EPYC
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, "avx512-vnni"),
    ("x86_64", {"avx2", "avx_vnni"}, "avx512-vnni"),                                # VNNI in its 256-bit form
    ("AMD64", set(), "avx2"),                                                       # flags unknown: safe settings
    ("aarch64", {"fp", "asimd", "asimddp"}, "arm64"),
    ("arm64", set(), "arm64"),
])
def test_auto_target_from_machine_and_flags(machine, flags, target):
    assert detect_target(machine, frozenset(flags))[0] == target
    settings = choose_settings("auto", machine=machine, flags=frozenset(flags))
    assert settings.target == target and settings.detected_from.startswith("auto: ")
    assert settings.reduce_range == (target == "avx2")


def test_cpu_model_and_flags_come_from_proc_cpuinfo(monkeypatch, tmp_path):
    """What `auto` and every speed figure name: the model line and the flags (x86 'flags', ARM 'Features')."""
    import platform

    from ipasdctl import runtime

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "Path", lambda p: info if p == "/proc/cpuinfo" else Path(p))
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000 \nflags\t\t: fpu avx2 avx512_vnni\n")
    assert runtime.cpu_model() == "Test CPU 9000"
    assert runtime.cpu_flags() == frozenset({"fpu", "avx2", "avx512_vnni"})
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # ARM: no model name line
    assert runtime.cpu_flags() == frozenset({"fp", "asimd", "asimddp"})
    assert runtime.cpu_model() == (platform.processor() or platform.machine())
    info.unlink()  # not Linux
    assert runtime.cpu_flags() == frozenset() and runtime.cpu_model() == (platform.processor() or platform.machine())


def test_unknown_target_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown --int8-target 'avx512'; known targets: auto, avx2, avx512-vnni, arm64"):
        choose_settings("avx512")
    assert set(TARGETS) == {"auto", "avx2", "avx512-vnni", "arm64"}
    # an unknown target says so with or without --int8; a known one without --int8 says it needs --int8
    for argv, said in ((["export", str(tmp_path), "--onnx", "--int8", "--int8-target", "sse4"], "unknown --int8-target"),
                       (["export", str(tmp_path), "--onnx", "--int8-target", "arm32"], "unknown --int8-target 'arm32'"),
                       (["export", str(tmp_path), "--onnx", "--int8-target", "arm64"], "needs --int8")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv + ["--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
        assert "known targets: auto, avx2, avx512-vnni, arm64" in err or said == "needs --int8"
        assert not (tmp_path / "x").exists()


def test_verdict():
    assert int8_verdict(2.0, 1.0) == {"fp32_p50_ms": 2.0, "int8_p50_ms": 1.0, "int8_vs_fp32": 2.0, "int8_pays": True}
    assert not int8_verdict(1.0, 1.0)["int8_pays"] and not int8_verdict(1.0, 1.25)["int8_pays"]


# ----------------------------------------------------------------------------------------------- the graph


def _quantised_ops(model) -> list[str]:
    """Operators wrapped as a QDQ unit (DequantizeLinear in, QuantizeLinear out: what onnxruntime runs in
    int8); a float operator that merely reads a dequantized tensor (the pooling's ReduceMean) is not one."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return [n.op_type for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and set(n.input) & dequantized and set(n.output) & quantized]


def _zero_point_types(model, op_type: str) -> set[int]:
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {inits[n.input[2]] for n in model.graph.node if n.op_type == op_type and len(n.input) > 2}


@pytest.mark.slow
def test_only_the_operators_that_pay_are_quantised(resnet8):
    model = onnx.load(str(resnet8["int8"]))
    quantised = _quantised_ops(model)
    assert "Conv" in quantised and "Gemm" in quantised
    assert set(quantised) <= QUANTISED_CONSUMERS, quantised
    # uint8 activations (U8S8): every QuantizeLinear writes uint8; weights dequantize from int8
    assert _zero_point_types(model, "QuantizeLinear") == {onnx.TensorProto.UINT8}
    assert onnx.TensorProto.INT8 in _zero_point_types(model, "DequantizeLinear")
    # reduce_range: weights use 7 bits, within [-64, 64]
    inits = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    weight = onnx.numpy_helper.to_array(inits[weight_dq.input[0]])
    assert weight.dtype == np.int8 and np.abs(weight.astype(int)).max() <= 64


@pytest.mark.slow
def test_preact_batchnorm_that_cannot_fold_stays_float(preact):
    model = onnx.load(str(preact["int8"]))
    batchnorms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    consumer_types = {}
    for n in model.graph.node:
        for i in n.input:
            consumer_types.setdefault(i, set()).add(n.op_type)
    assert batchnorms  # the pre-activation BNs after each residual Add
    for bn in batchnorms:  # float parameters, float output: not wrapped (its input may be a conv's int8 output)
        assert all(producer.get(i) != "DequantizeLinear" for i in bn.input[1:])
        assert "QuantizeLinear" not in consumer_types.get(bn.output[0], set())
    settings = preact["record"]["int8"]
    saved = json.loads(preact["int8"].with_suffix(".json").read_text())["quantization"]
    assert saved["batchnorm_left_float"] == len(batchnorms)
    assert saved["batchnorm_folded"] > 0  # each block's second BN follows a conv and folds into it
    assert settings["target"] == "avx512-vnni"
    assert set(_quantised_ops(model)) <= QUANTISED_CONSUMERS


@pytest.mark.slow
def test_arm64_target_writes_int8_activations(resnet8, tmp_path):
    record = export_onnx(resnet8["run"], tmp_path, int8=True, int8_target="arm64", calib_samples=32,
                         validation_batch_sizes=(1,))
    model = onnx.load(record["int8"]["onnx_path"])
    assert _zero_point_types(model, "QuantizeLinear") == {onnx.TensorProto.INT8}
    assert read_metadata(Path(record["int8"]["onnx_path"]))["quantization_settings"]["format"] == "S8S8"


# ----------------------------------------------------------------------------------------------- records


@pytest.mark.slow
def test_metadata_and_json_record_the_settings_and_the_speed_check(resnet8):
    meta = read_metadata(resnet8["int8"])
    saved = json.loads(resnet8["int8"].with_suffix(".json").read_text())
    assert meta["int8_target"] == "avx2" and "U8S8" in meta["quantization"] and "reduce_range" in meta["quantization"]
    settings = meta["quantization_settings"]
    assert settings == saved["quantization"]
    assert (settings["activation_type"], settings["weight_type"], settings["reduce_range"]) == ("QUInt8", "QInt8", True)
    assert settings["op_types"][:3] == list(COMPUTE_OPS) and settings["detected_from"] == "--int8-target"
    assert settings["calibration_samples"] == 64 and settings["batchnorm_left_float"] == 0
    raw = ort.InferenceSession(str(resnet8["int8"]), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(raw.custom_metadata_map["quantization_settings"]) == settings
    speed = saved["speed_check"]
    assert speed == meta["int8_speed_check"] == resnet8["record"]["int8"]["speed_check"]
    assert speed["batch_size"] == 1 and speed["runs"] == 40 and "alternating" in speed["measured"]
    assert speed["int8_pays"] == (speed["fp32_p50_ms"] > speed["int8_p50_ms"]) == resnet8["record"]["int8"]["pays"]
    assert saved["fp32_onnx_file"] == resnet8["fp32"].name


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_test_images(resnet8):
    data = build_data(load_recipe("demo").data)
    x, y = next(iter(data.test_batches(256, torch.device("cpu"))))
    x = np.ascontiguousarray(x.numpy())
    fp32, int8 = (ort.InferenceSession(str(resnet8[k]), providers=["CPUExecutionProvider"]) for k in ("fp32", "int8"))
    fp32_top1 = fp32.run(None, {"images": x})[0].argmax(1)
    int8_top1 = int8.run(None, {"images": x})[0].argmax(1)
    assert (fp32_top1 == y.numpy()).mean() > 0.5  # the model learnt something, so agreement means something
    assert (int8_top1 == fp32_top1).mean() >= 0.9
    assert abs(resnet8["record"]["onnx_test"]["top1"] - resnet8["record"]["int8"]["test_top1"]) <= 5.0


# ----------------------------------------------------------------------------------------------- verdicts


@pytest.mark.slow
def test_bench_marks_int8_rows_against_the_fp32_original(resnet8, tmp_path, capsys):
    rows, csv_path = bench(resnet8["int8"], [1, 2], threads=1, runs=3, warmup=1, out=tmp_path, with_torch=False)
    table = pd.read_csv(csv_path)
    cpu = table[table["provider"] == "CPUExecutionProvider"]
    assert sorted(cpu["batch_size"]) == [1, 2]
    assert cpu["int8_vs_fp32"].notna().all() and (cpu["int8_vs_fp32"] > 0).all()
    assert set(cpu["int8_pays"]) <= {True, False}
    assert (cpu["int8_pays"] == (cpu["int8_vs_fp32"] > 1)).all()
    # an fp32 model's rows carry no verdict
    bench(resnet8["fp32"], [1], threads=1, runs=2, warmup=0, out=tmp_path, with_torch=False)
    table = pd.read_csv(csv_path)
    assert table.loc[table["precision"] == "fp32", "int8_pays"].isna().all()
    with pytest.raises(SystemExit):
        cli.main(["bench", str(resnet8["int8"]), "--runs", "2", "--batch-sizes", "1", "--no-torch",
                  "--threads", "1", "--out", str(tmp_path)])
    header = capsys.readouterr().out.splitlines()[1]
    assert "vs_fp32" in header and "int8_pays" in header


@pytest.mark.slow
def test_export_says_in_one_line_when_int8_does_not_pay(resnet8, tmp_path, capsys, monkeypatch):
    import ipasdctl.deploy.formats.onnx_int8 as export_module

    def slower(fp32_path, int8_path, x, threads=None, runs=40, warmup=5):
        return {**int8_verdict(1.0, 1.5), "batch_size": int(x.shape[0]), "runs": runs, "warmup": warmup,
                "threads": 1, "cpu_model": "test", "measured": "simulated"}

    monkeypatch.setattr(export_module, "int8_speed_check", slower)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(resnet8["run"]), "--onnx", "--int8", "--int8-target", "avx512-vnni",
                  "--calib-samples", "16", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = [line for line in lines if "not faster than fp32" in line]
    assert len(verdicts) == 1 and "1.500 ms against 1.000 ms" in verdicts[0]
    assert any(line.startswith("int8: avx512-vnni target: U8S8") for line in lines)
    saved = json.loads((tmp_path / f"{resnet8['run'].name}-int8.json").read_text())
    assert saved["speed_check"]["int8_pays"] is False
