"""`ipasdctl prune` on the command line: bad input is one line, exit 2, and nothing written; it chains
(`train ... prune ... export`) and a rerun of the chain reuses the finished prune."""

from __future__ import annotations

import json

import pytest

from ipasdctl.runs import RunFolder
from tests.helpers import cli_error, copy_run, run_cli, snapshot

TARGET = ["--target-macs", "0.5"]


@pytest.mark.parametrize("args, says", [
    ([], "prune needs a target: --target-macs F"),
    ([*TARGET, "--target-latency-ms", "1"], "give one target: --target-macs or --target-latency-ms, not both"),
    (["--target-macs", "1.5"], "--target-macs is the fraction of the run's MACs to keep, from 0 to 1"),
    (["--target-macs", "0"], "--target-macs is the fraction"),
    (["--target-latency-ms", "-1"], "--target-latency-ms must be a positive number of milliseconds"),
    ([*TARGET, "--importance", "l1"], "--importance must be one of magnitude, taylor, bn-scale, got 'l1'"),
    ([*TARGET, "--method", "ipsad"], "unknown method 'ipsad' (did you mean 'ipasd'?)"),
    ([*TARGET, "--steps", "0"], "--steps must be from 1 (one shot) to 20"),
    ([*TARGET, "--round-to", "0"], "--round-to must be a whole number of channels from 1 (no rounding) to 256"),
    (["--target-macs", "0.05", "--round-to", "16"], "(kept in multiples of 16 channels) leaves"),
    ([*TARGET, "--epochs", "0"], "--epochs must be at least 1"),
    ([*TARGET, "--checkpoint", "middle"], "--checkpoint must be best or last"),
    ([*TARGET, "--teacher-original", "--method", "ce"], "--teacher-original needs a method that distils"),
    ([*TARGET, "--set", "optim.lrr=1"], "unknown recipe key 'optim.lrr' (did you mean 'lr'?)"),
    ([*TARGET, "--name", "../elsewhere"], "--name '../elsewhere' must be a plain folder name"),
    (["--target-macs", "0.001"], "the MACs target is unreachable: removing 90% of the channels (kept in multiples of 8 "
                                 "channels) leaves"),
    (["--target-macs", "0.001", "--round-to", "1"], "the MACs target is unreachable: removing 90% of the channels "
                                                    "leaves"),
    (["--target-latency-ms", "100000"], "already runs in"),
])
def test_bad_input_is_one_line_and_writes_nothing(demo_run, tmp_path, capsys, args, says):
    before = snapshot(demo_run)
    line = cli_error(["prune", str(demo_run), "--out", str(tmp_path / "out"), *args], capsys)
    assert says in line, line
    assert not (tmp_path / "out").exists() and snapshot(demo_run) == before


def test_a_run_that_is_not_finished_or_no_run_is_one_line(demo_run, tmp_path, capsys):
    run = copy_run(demo_run, tmp_path / "unfinished")
    summary = json.loads(RunFolder(run).summary.read_text())
    RunFolder(run).summary.write_text(json.dumps({**summary, "finished": False}))
    line = cli_error(["prune", str(run), *TARGET], capsys)
    assert "is not a finished run" in line and f"ipasdctl train --resume {run}" in line
    line = cli_error(["prune", str(tmp_path / "missing"), *TARGET], capsys)
    assert "does not exist" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unfinished"]


def test_a_bad_prune_link_stops_the_chain_before_anything_trains(tmp_path, capsys):
    line = cli_error(["train", "--epochs", "1", "--out", str(tmp_path / "runs"), "prune", "--target-macs", "2"], capsys)
    assert "--target-macs is the fraction" in line and not (tmp_path / "runs").exists()


@pytest.mark.slow  # a chain of three links, run twice: two trainings and two exports
def test_train_prune_export_chains_and_a_rerun_reuses_the_pruned_run(tmp_path, capsys):
    runs, exports = tmp_path / "runs", tmp_path / "exports"
    chain = ["train", "--method", "ce", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "-q",
             "--set", "data.train_subset=64", "--out", str(runs),
             "prune", "--target-macs", "0.5", "--epochs", "1", "-q", "export", "--out", str(exports), "-q"]
    code, out, err = run_cli(chain, capsys)
    assert code == 0, err
    source, pruned = runs / "digits-resnet8-ce-s0", runs / "digits-resnet8-ce-s0-pruned-50"
    assert RunFolder(pruned).state() == "finished"
    # export took both runs of the chain: the source's and the pruned one's models, each under its own name
    assert out.split() == [str(source), str(pruned), str(exports / "digits-resnet8-ce-s0.onnx"),
                           str(exports / "digits-resnet8-pruned-50-ce-s0.onnx")]
    before = snapshot(pruned)
    code, out, err = run_cli([a for a in chain if a != "-q"], capsys)
    assert code == 0, err
    assert f"{pruned}: pruned with these settings, reused" in err
    assert sorted(p.name for p in runs.iterdir()) == [source.name, pruned.name] and snapshot(pruned) == before


def test_the_defaults_in_help_are_the_librarys(capsys):
    from ipasdctl.cli import prune as command
    from ipasdctl.compress import DEFAULT_EPOCHS, LR_SCALE, ROUND_TO, PruneSettings

    assert (command.DEFAULT_EPOCHS, command.LR_SCALE, command.ROUND_TO) == (DEFAULT_EPOCHS, LR_SCALE, ROUND_TO)
    assert (PruneSettings().epochs, PruneSettings().lr_scale, PruneSettings().round_to) == \
        (DEFAULT_EPOCHS, LR_SCALE, ROUND_TO)
    code, out, _ = run_cli(["prune", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and f"Recovery epochs of each step. [default: {DEFAULT_EPOCHS}]" in text
    assert f"slower than the original (docs/performance.md). [default: {ROUND_TO}]" in text
    assert f"[default: {LR_SCALE}]" in text and "without warm-up on a cosine schedule" in text
