"""INT8 against fp32, per model, on this CPU: does `export --int8` pay, and what does it cost in top-1? (issue 20)

Each model is trained on CIFAR-10 (ce, a class-balanced subset of the CPU recipe), exported to fp32 and INT8
ONNX (`--int8-target auto`), and timed with `ipasdctl bench`'s own code at 2 threads: batch 1 (fp32 with
PyTorch eager beside it, then INT8 against fp32) and batch 64 (INT8 against fp32). Both exports are evaluated
in onnxruntime on the full 10,000-image test set. The table, with the CPU's model and its SIMD flags, is
printed and written to IPASDCTL_BENCH_TABLE when set.

    IPASDCTL_CIFAR=../shared/data .venv/bin/python -m pytest benchmarks/test_bench_int8.py --benchmark-only -s

Knobs:
- IPASDCTL_BENCH_INT8_MODELS: comma-separated, default the four below.
- IPASDCTL_BENCH_EPOCHS, IPASDCTL_BENCH_TRAIN_SUBSET: the training budget, one number for every model or
  per model, e.g. "resnet20=30,wrn16_2=30,mobilenetv2=10,preact_resnet18=6" (default 1 epoch on 2,000
  images: enough for latency, not for a meaningful accuracy drop).
- IPASDCTL_BENCH_RUNS_DIR: keep the trained runs there (one folder per model) and reuse a finished one, so
  that training (hours, for the accuracy drop) and timing (minutes, on a quiet machine) can be run apart:
  `python benchmarks/test_bench_int8.py` trains them and times nothing.
- IPASDCTL_BENCH_RUNS: timed runs at batch 1 (100); batch 64 gets a tenth, at least 5.
"""

import json
import os
from pathlib import Path

import pytest
from conftest import report

from ipasdctl import runtime
from ipasdctl.config import load_recipe
from ipasdctl.deploy import export_onnx
from ipasdctl.deploy.bench import bench
from ipasdctl.models import MODELS as MODELS_REGISTRY
from ipasdctl.training import Progress, train

MODELS = ("resnet20", "wrn16_2", "mobilenetv2", "preact_resnet18")
SIMD = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp")
THREADS = 2


def _p50(rows, backend: str = "onnxruntime") -> float:
    return float(rows.loc[(rows["backend"] == backend) & (rows["provider"].isin(["CPUExecutionProvider", "cpu"])),
                          "p50_ms"].iloc[0])


def per_model(name: str, default: int, models: list[str]) -> dict[str, int]:
    """An integer knob: one number for every model, or "arch=N,..." (models not named get the default)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return dict.fromkeys(models, default)
    if "=" not in text:
        return dict.fromkeys(models, int(text))
    given = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    unknown = sorted(m for m in given if m not in MODELS_REGISTRY)
    if unknown:  # a misspelt architecture would silently leave the model it meant on the default budget
        raise ValueError(f"{name} names {', '.join(unknown)}: not an architecture (see `ipasdctl list models`)")
    return {m: given.get(m, default) for m in models}


def trained_run(arch: str, root: str, runs_dir: Path, epochs: int, subset: int) -> Path:
    """The model's ce run of the CPU recipe; a finished run of exactly this budget in runs_dir is reused."""
    recipe = load_recipe("cifar10_resnet8_cpu", {"model": {"arch": arch}, "method": {"name": "ce"},
                                                 "data": {"root": root, "train_subset": subset},
                                                 "train": {"epochs": epochs}})
    return train(recipe, runs_dir, name=f"{arch}-e{epochs}-n{subset}", progress=Progress(enabled=True), reuse=True)


def measure_model(run_dir: Path, out: Path, runs: int) -> dict:
    record = export_onnx(run_dir, out / "exports", int8=True, calib_samples=512)
    fp32, int8 = Path(record["onnx_path"]), Path(record["int8"]["onnx_path"])
    b1_fp32, _ = bench(fp32, [1], THREADS, runs, out=out / "b1-fp32.csv")  # onnxruntime and PyTorch eager
    b1_int8, _ = bench(int8, [1], THREADS, runs, out=out / "b1-int8.csv", with_torch=False)
    b64_int8, _ = bench(int8, [64], THREADS, max(5, runs // 10), out=out / "b64-int8.csv", with_torch=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {"model": summary["arch"], "epochs": summary["epochs"], "train_images": summary["train_images"],
           "params_M": record["params"] / 1e6}
    for label, rows in (("b1", b1_int8), ("b64", b64_int8)):
        int8_p50, ratio = _p50(rows), float(rows["int8_vs_fp32"].iloc[0])
        row.update({f"{label}_fp32_ms": int8_p50 * ratio, f"{label}_int8_ms": int8_p50, f"{label}_speedup": ratio})
    row["b1_eager_ms"] = _p50(b1_fp32, "pytorch")
    row["b1_ort_over_eager"] = _p50(b1_fp32) / row["b1_eager_ms"]
    row.update({"fp32_top1": record["onnx_test"]["top1"], "int8_top1": record["int8"]["test_top1"],
                "drop": record["onnx_test"]["top1"] - record["int8"]["test_top1"], "test_n": record["onnx_test"]["n"],
                "export_says_pays": record["int8"]["pays"], "target": record["int8"]["target"]})
    return row


def markdown(rows: list[dict]) -> str:
    flags = sorted(f for f in runtime.cpu_flags() if f in SIMD)
    lines = [f"CPU: {runtime.cpu_model()}; SIMD flags: {' '.join(flags) or 'unknown'}; onnxruntime CPU provider, "
             f"{THREADS} threads, p50; models trained with ce on a class-balanced CIFAR-10 subset; top-1 in "
             "onnxruntime on the full test set", "",
             "| model | trained | target | fp32 b1 | int8 b1 | speed-up b1 | fp32 b64 | int8 b64 | speed-up b64 | "
             "ORT fp32 / eager b1 | fp32 top-1 | int8 top-1 | drop |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['epochs']} ep x {r['train_images']} | {r['target']} | "
                     f"{r['b1_fp32_ms']:.3f} ms | {r['b1_int8_ms']:.3f} ms | "
                     f"{r['b1_speedup']:.2f}x | {r['b64_fp32_ms']:.1f} ms | {r['b64_int8_ms']:.1f} ms | "
                     f"{r['b64_speedup']:.2f}x | {r['b1_ort_over_eager']:.2f} | {r['fp32_top1']:.2f} | "
                     f"{r['int8_top1']:.2f} | {r['drop']:+.2f} |")
    return "\n".join(lines) + "\n"


def plan() -> tuple[list[str], dict[str, int], dict[str, int]]:
    models = [m.strip() for m in os.environ.get("IPASDCTL_BENCH_INT8_MODELS", ",".join(MODELS)).split(",") if m.strip()]
    return models, per_model("IPASDCTL_BENCH_EPOCHS", 1, models), per_model("IPASDCTL_BENCH_TRAIN_SUBSET", 2000, models)


def test_int8_against_fp32_per_model(benchmark, cifar_root, tmp_path):
    if not cifar_root:
        pytest.skip("set IPASDCTL_CIFAR to the folder holding cifar-10-batches-py/")
    models, epochs, subset = plan()
    runs_dir = Path(os.environ.get("IPASDCTL_BENCH_RUNS_DIR") or tmp_path / "runs")
    runs = int(os.environ.get("IPASDCTL_BENCH_RUNS", "100"))
    run_dirs = {m: trained_run(m, cifar_root, runs_dir, epochs[m], subset[m]) for m in models}  # untimed

    def measure():
        return [measure_model(run_dirs[m], tmp_path / m, runs) for m in models]

    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    report(f"INT8 against fp32 ({runtime.cpu_model()}, {THREADS} threads)", rows)
    table = markdown(rows)
    print("\n" + table)
    if os.environ.get("IPASDCTL_BENCH_TABLE"):
        Path(os.environ["IPASDCTL_BENCH_TABLE"]).write_text(table)
    assert all(r["test_n"] > 0 and r["b1_int8_ms"] > 0 for r in rows)


if __name__ == "__main__":  # train (or finish) the runs only, into IPASDCTL_BENCH_RUNS_DIR; time nothing
    if not os.environ.get("IPASDCTL_CIFAR") or not os.environ.get("IPASDCTL_BENCH_RUNS_DIR"):
        raise SystemExit("set IPASDCTL_CIFAR and IPASDCTL_BENCH_RUNS_DIR")
    chosen, epochs_of, subset_of = plan()
    for arch in chosen:
        print(trained_run(arch, os.environ["IPASDCTL_CIFAR"], Path(os.environ["IPASDCTL_BENCH_RUNS_DIR"]),
                          epochs_of[arch], subset_of[arch]), flush=True)
