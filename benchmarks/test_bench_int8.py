"""INT8 against fp32, per model, on this CPU: does `export --int8` pay? (issue 20)

Each model is trained briefly on CIFAR-10 (ce, a class-balanced subset; enough for latency, not for a
meaningful accuracy drop: set IPASDCTL_BENCH_EPOCHS=30 and IPASDCTL_BENCH_TRAIN_SUBSET=10000 for the CPU
recipe's budget), exported to fp32 and INT8 ONNX (`--int8-target auto`), and timed with `ipasdctl bench`'s
own code at 2 threads: batch 1 (fp32 with PyTorch eager beside it, then INT8 against fp32) and batch 64 (INT8
against fp32). The table, with the CPU's model and its SIMD flags, is printed and written to
IPASDCTL_BENCH_TABLE when set.

    IPASDCTL_CIFAR=../shared/data .venv/bin/python -m pytest benchmarks/test_bench_int8.py --benchmark-only -s

Knobs: IPASDCTL_BENCH_INT8_MODELS (comma-separated, default the four below), IPASDCTL_BENCH_EPOCHS (1),
IPASDCTL_BENCH_TRAIN_SUBSET (2000), IPASDCTL_BENCH_RUNS (runs at batch 1: 100; batch 64 gets a tenth, at least 5).
"""

import os
from pathlib import Path

import pytest
from conftest import report

from ipasdctl import runtime
from ipasdctl.config import load_recipe
from ipasdctl.deploy import export_onnx
from ipasdctl.deploy.bench import bench
from ipasdctl.training import Progress, train

MODELS = ("resnet20", "wrn16_2", "mobilenetv2", "preact_resnet18")
SIMD = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp")
THREADS = 2


def _p50(rows, backend: str = "onnxruntime") -> float:
    return float(rows.loc[(rows["backend"] == backend) & (rows["provider"].isin(["CPUExecutionProvider", "cpu"])),
                          "p50_ms"].iloc[0])


def measure_model(arch: str, root: str, out: Path, epochs: int, subset: int, runs: int) -> dict:
    recipe = load_recipe("cifar10_resnet8_cpu", {"model": {"arch": arch}, "method": {"name": "ce"},
                                                 "data": {"root": root, "train_subset": subset},
                                                 "train": {"epochs": epochs}})
    run_dir = train(recipe, out / "runs", progress=Progress(enabled=False))
    record = export_onnx(run_dir, out / "exports", int8=True, calib_samples=512)
    fp32, int8 = Path(record["onnx_path"]), Path(record["int8"]["onnx_path"])
    b1_fp32, _ = bench(fp32, [1], THREADS, runs, out=out / "b1-fp32.csv")  # onnxruntime and PyTorch eager
    b1_int8, _ = bench(int8, [1], THREADS, runs, out=out / "b1-int8.csv", with_torch=False)
    b64_int8, _ = bench(int8, [64], THREADS, max(5, runs // 10), out=out / "b64-int8.csv", with_torch=False)
    row = {"model": arch, "params_M": record["params"] / 1e6}
    for label, rows in (("b1", b1_int8), ("b64", b64_int8)):
        int8_p50, ratio = _p50(rows), float(rows["int8_vs_fp32"].iloc[0])
        row.update({f"{label}_fp32_ms": int8_p50 * ratio, f"{label}_int8_ms": int8_p50, f"{label}_speedup": ratio})
    row["b1_eager_ms"] = _p50(b1_fp32, "pytorch")
    row["b1_ort_over_eager"] = _p50(b1_fp32) / row["b1_eager_ms"]
    row.update({"fp32_top1": record["onnx_test"]["top1"], "int8_top1": record["int8"]["test_top1"],
                "drop": record["onnx_test"]["top1"] - record["int8"]["test_top1"], "test_n": record["onnx_test"]["n"],
                "export_says_pays": record["int8"]["pays"], "target": record["int8"]["target"]})
    return row


def markdown(rows: list[dict], epochs: int, subset: int) -> str:
    flags = sorted(f for f in runtime.cpu_flags() if f in SIMD)
    lines = [f"CPU: {runtime.cpu_model()}; SIMD flags: {' '.join(flags) or 'unknown'}; onnxruntime CPU provider, "
             f"{THREADS} threads, p50; models trained {epochs} epoch(s) on a {subset}-image CIFAR-10 subset (ce)", "",
             "| model | target | fp32 b1 | int8 b1 | speed-up b1 | fp32 b64 | int8 b64 | speed-up b64 | "
             "ORT fp32 / eager b1 | fp32 top-1 | int8 top-1 | drop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target']} | {r['b1_fp32_ms']:.3f} ms | {r['b1_int8_ms']:.3f} ms | "
                     f"{r['b1_speedup']:.2f}x | {r['b64_fp32_ms']:.1f} ms | {r['b64_int8_ms']:.1f} ms | "
                     f"{r['b64_speedup']:.2f}x | {r['b1_ort_over_eager']:.2f} | {r['fp32_top1']:.2f} | "
                     f"{r['int8_top1']:.2f} | {r['drop']:+.2f} |")
    return "\n".join(lines) + "\n"


def test_int8_against_fp32_per_model(benchmark, cifar_root, tmp_path):
    if not cifar_root:
        pytest.skip("set IPASDCTL_CIFAR to the folder holding cifar-10-batches-py/")
    models = [m.strip() for m in os.environ.get("IPASDCTL_BENCH_INT8_MODELS", ",".join(MODELS)).split(",") if m.strip()]
    epochs = int(os.environ.get("IPASDCTL_BENCH_EPOCHS", "1"))
    subset = int(os.environ.get("IPASDCTL_BENCH_TRAIN_SUBSET", "2000"))
    runs = int(os.environ.get("IPASDCTL_BENCH_RUNS", "100"))

    def measure():
        return [measure_model(m, cifar_root, tmp_path / m, epochs, subset, runs) for m in models]

    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    report(f"INT8 against fp32 ({runtime.cpu_model()}, {THREADS} threads)", rows)
    table = markdown(rows, epochs, subset)
    print("\n" + table)
    if os.environ.get("IPASDCTL_BENCH_TABLE"):
        Path(os.environ["IPASDCTL_BENCH_TABLE"]).write_text(table)
    assert all(r["test_n"] > 0 and r["b1_int8_ms"] > 0 for r in rows)
