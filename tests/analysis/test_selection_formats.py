"""The selection table spans the export formats: fp16 rows beside fp32 and int8 (one row per architecture,
method and format), so `report --max-latency-ms` picks among them, and one slower than its fp32 row is never
picked. Hand-made results.csv, export jsons and latency.csv (test_selection.py's workspace, plus fp16 exports)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ipasdctl.analysis.selection import best_under_budget, selection_table
from tests.analysis.test_selection import row, workspace  # noqa: F401 (the fixture)


def _add_fp16(workspace: dict, p50_ms: float, top1_by_seed: dict[int, float]) -> None:
    """fp16 exports of ipasd / resnet8 (seeds 0 and 1), their records as `export --format onnx-fp16` writes them."""
    exports = workspace["exports"]
    latency = pd.read_csv(exports / "latency.csv")
    rows = []
    for seed, top1 in top1_by_seed.items():
        name = f"ipasd-r8-s{seed}-fp16"
        record = {"format": "ipasdctl-export-1", "name": name, "onnx_file": f"{name}.onnx", "precision": "fp16",
                  "export_format": "onnx-fp16", "run_dir": str(workspace["comparisons"][0] / f"ipasd-resnet8-s{seed}"),
                  "file_size_bytes": 150_000, "onnx_test": {"top1": top1, "top5": 95.0, "n": 10000}}
        (exports / f"{name}.json").write_text(json.dumps(record))
        (exports / f"{name}.onnx").write_bytes(b"\0" * 8)
        rows.append({"model": f"{name}.onnx", "precision": "fp16", "backend": "onnxruntime",
                     "provider": "CPUExecutionProvider", "batch_size": 1, "threads": 4, "p50_ms": p50_ms,
                     "p90_ms": p50_ms, "p99_ms": p50_ms, "mean_ms": p50_ms, "throughput_ips": 1000 / p50_ms,
                     "cpu_model": "Test CPU", "model_path": str(exports / f"{name}.onnx")})
    pd.concat([latency, pd.DataFrame(rows)], ignore_index=True).to_csv(exports / "latency.csv", index=False)


def test_fp16_rows_stand_beside_fp32_and_int8_and_can_be_picked(workspace):
    _add_fp16(workspace, 0.7, {0: 78.0, 1: 78.0})  # faster than fp32 (0.9 / 1.1 ms), more accurate than int8
    table = selection_table(workspace["comparisons"], workspace["exports"], 0.8)
    formats = table[(table["method"] == "ipasd") & (table["arch"] == "resnet8")][["format", "precision"]]
    assert sorted(map(tuple, formats.to_numpy())) == [("onnx", "fp32"), ("onnx-fp16", "fp16"), ("onnx-int8", "int8")]
    fp16 = row(table, "ipasd", "resnet8", "fp16")
    assert fp16["top1"] == pytest.approx(78.0) and fp16["latency_ms"] == pytest.approx(0.7) and fp16["seeds"] == 2
    assert fp16["accuracy_source"].startswith("onnxruntime fp16") and not fp16["slower_than_fp32"]
    assert fp16["file_size_mb"] == pytest.approx(0.15) and fp16["within_budget"]
    pick = best_under_budget(table, 0.8)
    assert list(zip(pick["dataset"], pick["format"], pick["top1"])) == [("cifar10", "onnx-fp16", 78.0)]


def test_an_fp16_row_slower_than_fp32_is_flagged_and_never_picked(workspace):
    _add_fp16(workspace, 1.2, {0: 99.0, 1: 99.0})  # the most accurate, but slower than its fp32 row on this CPU
    table = selection_table(workspace["comparisons"], workspace["exports"], 5.0)
    assert row(table, "ipasd", "resnet8", "fp16")["slower_than_fp32"]
    pick = best_under_budget(table, 5.0)
    assert list(pick["format"]) != ["onnx-fp16"] and (pick["precision"] != "fp16").all()
