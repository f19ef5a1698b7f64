"""Hostile tables and reports: CSV cells a spreadsheet would run as formulas are neutralised by every writer,
results.csv rows that point elsewhere or disagree with a run's own config, export records of the wrong types.
"""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ipasdctl.analysis.collect import collect_runs
from ipasdctl.analysis.selection import load_exports
from ipasdctl.cli import main
from ipasdctl.safe_io import csv_text, FORMULA_STARTS
from ipasdctl.runs import write_metrics_csv
from ipasdctl.training import train
from tests.helpers import copy_run, tiny_onnx
from tests.robustness.fuzz_loaders import formula_cells


def fake_comparison(folder, top1: float):
    """A comparison folder as `compare` writes it (absolute run_dir in results.csv), with one ce run."""
    run_dir = folder / "ce-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "ce"}, "train": {"seed": 0}}))
    row = {"method": "ce", "seed": 0, "arch": "resnet8", "dataset": "cifar10", "epochs": 1, "best_top1": top1,
           "last_top1": top1, "best_epoch": 1, "run_dir": str(run_dir.resolve())}
    pd.DataFrame([row]).to_csv(folder / "results.csv", index=False)


def test_report_of_a_renamed_comparison_reads_its_own_runs(tmp_path, capsys):
    old, moved = tmp_path / "cmp", tmp_path / "cmp-old"
    fake_comparison(old, 11.0)
    old.rename(moved)
    fake_comparison(old, 99.0)  # a new comparison at the old path
    runs, _ = collect_runs([moved])
    assert [r.run_dir for r in runs] == [moved / "ce-s0"] and runs[0].row["best_top1"] == 11.0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and str(old.resolve() / "ce-s0") in warning[0] and "outside this comparison" in warning[0]
    runs, _ = collect_runs([moved, old])  # both: two runs, not one evaluated twice
    assert sorted(r.row["best_top1"] for r in runs) == [11.0, 99.0]


def test_a_row_pointing_elsewhere_without_a_run_here_is_left_out_with_one_warning(tmp_path, capsys):
    elsewhere, cmp = tmp_path / "elsewhere", tmp_path / "cmp"
    fake_comparison(elsewhere, 50.0)
    cmp.mkdir()
    shutil.copy(elsewhere / "results.csv", cmp / "results.csv")
    runs, _ = collect_runs([cmp])
    assert runs == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside this comparison; it is left out of the report" in err[0]


def test_export_records_of_the_wrong_types_are_not_a_crash(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"run_dir": 5, "onnx_file": ["x"]}))
    (tmp_path / "b.json").write_text(json.dumps({"run_dir": "/runs/r", "onnx_file": "b.onnx", "onnx_test": [1],
                                                 "file_size_bytes": "big", "test_top1": "high", "precision": 3}))
    (tmp_path / "c.json").write_text(json.dumps({"run_dir": "/runs/r", "onnx_file": "c.onnx", "test_top1": 10**400}))
    table = load_exports(tmp_path)
    assert list(table["export"]) == ["b.onnx", "c.onnx"]
    assert table["export_top1"].isna().all() and list(table["precision"]) == ["fp32", "fp32"]
    assert np.isnan(table["file_size_bytes"].iloc[0])


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
