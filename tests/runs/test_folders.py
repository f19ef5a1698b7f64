"""runs/: what a run folder's files hold (RunSummary, Checkpoint) and where a comparison folder's files are."""

from __future__ import annotations

import dataclasses
import json

from ipasdctl.config import load_recipe
from ipasdctl.runs import BestEpoch, Checkpoint, ComparisonFolder, DataStats, RunFolder, RunSummary, check_state
from ipasdctl.safe_io import load_checkpoint
from ipasdctl.studies import plan as planning


def test_the_trainer_writes_the_fields_the_schemas_declare_in_their_order(demo_run):
    for which in ("last", "best"):
        state = load_checkpoint(RunFolder(demo_run).checkpoint(which))
        assert list(state) == list(Checkpoint.__annotations__), which
        assert list(state["best"]) == list(BestEpoch.__annotations__)
        assert list(state["data_stats"]) == list(DataStats.__annotations__)
        assert check_state(state, demo_run) is state
    written = json.loads(RunFolder(demo_run).summary.read_text())
    assert list(written) == [field.name for field in dataclasses.fields(RunSummary)]
    summary = RunFolder(demo_run).read_summary()
    assert summary == RunSummary(**written) and summary.finished and summary.epochs == 1
    assert RunFolder(demo_run).result_row() == {**summary.result_row(), "run_dir": str(demo_run)}


def test_a_summary_of_another_version_reads_with_its_fields_and_only_true_finishes(tmp_path):
    folder = RunFolder(tmp_path)
    folder.summary.write_text(json.dumps({"best_top1": 51.5, "seed": 3, "field_of_a_newer_version": 1,
                                          "finished": "yes"}))
    summary = folder.read_summary()
    assert (summary.best_top1, summary.seed, summary.last_top1) == (51.5, 3, None)
    assert summary.finished is False and folder.state() == "new"  # "yes" is not true
    folder.summary.write_text(json.dumps({"finished": True}))
    assert folder.state() == "finished"
    folder.summary.write_text("[1, 2]")
    assert folder.read_summary() is None


def test_an_unfinished_summary_leaves_the_result_row_to_the_config(tmp_path):
    """A summary without "finished": true is no finished run's: the row comes from config.yaml, as for a run
    that has no summary at all."""
    folder = RunFolder(tmp_path)
    folder.write_config(load_recipe("demo", {"train": {"seed": 7}}))
    folder.summary.write_text(json.dumps({"seed": 99, "best_top1": 1.0}))
    row = folder.result_row()
    assert (row["seed"], row["method"], row["best_top1"]) == (7, "ipasd", None)


def test_the_comparison_folder_holds_the_planned_run_folders_and_its_own_lock(tmp_path):
    comparison = planning.plan(load_recipe("demo", {"train": {"epochs": 1}}), "ls", [4], tmp_path / "c")
    folder = ComparisonFolder(tmp_path / "c")
    assert [run.run_dir for run in comparison.runs] == [folder.run(m, 4).path for m in ("ce", "ipasd", "ls")]
    assert folder.run("ce", 4).path.name == "ce-s4" and folder.run("ce", 4).path.parent == folder.path
    assert planning.reference_run(folder.path, 4) == str(folder.run("ce", 4).path.resolve())
    assert folder.lock().path == RunFolder(folder.path).lock().path == folder.path / ".lock"
    assert not folder.is_comparison()
    folder.path.mkdir()
    folder.results.write_text("method,seed\n")
    assert folder.is_comparison()
