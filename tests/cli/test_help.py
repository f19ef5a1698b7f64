"""What --help and `list methods` say: commands in the order they chain, each summarised by a whole sentence,
readable metavars, the defaults of --seed and --device, --onnx not shown as a switch that cannot be turned off,
one line per method; and --threads on every command that computes."""

from __future__ import annotations

import json
import re

import pytest
import typer

from ipasdctl.cli import app, main
from ipasdctl.cli.app import COMMAND_ORDER, first_sentence
from ipasdctl.config import TrainConfig


def help_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    return " ".join(text.split())


def commands_listed(text: str) -> list[tuple[str, str]]:
    """(name, summary) of each command in the top-level help's Commands section (summaries unwrapped)."""
    section = text.split("Commands:\n", 1)[1]
    rows: list[list[str]] = []
    for line in section.splitlines():
        match = re.match(r"  (\S+)\s+(.*)", line)
        if match and not line.startswith("   "):
            rows.append([match[1], match[2]])
        elif line.strip():
            rows[-1][1] += " " + line.strip()
    return [(name, summary) for name, summary in rows]


def test_commands_are_listed_in_chain_order_each_with_a_whole_sentence(capsys):
    listed = commands_listed(help_of(capsys))
    assert [name for name, _ in listed] == list(COMMAND_ORDER)
    docs = {name: command.help for name, command in typer.main.get_command(app).commands.items()}
    for name, summary in listed:
        assert summary.endswith(".") and "..." not in summary, (name, summary)
        assert flat(docs[name]).startswith(summary[:-1]), (name, summary)  # the docstring's own words, uncut


def test_a_summary_is_the_first_sentence_or_the_clause_before_its_semicolon():
    assert first_sentence("Train one model; prints its folder.\n\nMore.") == "Train one model."
    assert first_sentence("Latency (p50; p99) per size. Then more.") == "Latency (p50; p99) per size."
    assert first_sentence("One line without a period") == "One line without a period."


def test_metavars_and_defaults_read_as_words(capsys):
    train = flat(help_of(capsys, "train"))
    for shown in ("--set KEY=VALUE", "--recipe NAME|PATH", "--data DIR", "--seed N", "--device DEVICE",
                  "--threads N", "--resume RUN_FOLDER", "--track tensorboard|mlflow"):
        assert shown in train, shown
    assert "<list[str]>" not in train
    defaults = TrainConfig()
    assert f"train.seed; {defaults.seed} if it sets none" in train
    assert f"train.device; {defaults.device} if it sets none" in train
    predict = help_of(capsys, "predict")
    assert " predict [OPTIONS] MODEL.onnx|RUN_FOLDER IMAGE...\n" in predict.splitlines(keepends=True)[0]
    assert "{" not in predict and "<list[Path]>" not in predict
    export = flat(help_of(capsys, "export"))
    assert "[RUN_FOLDER]" in export and "[default: True]" not in export


def test_list_methods_gives_each_method_one_line(capsys):
    from ipasdctl.methods import METHODS

    with pytest.raises(SystemExit):
        main(["list", "methods"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == METHODS.names()
    for line, name in zip(lines, METHODS.names()):
        description = line[len(name):].strip()
        assert description == METHODS.get(name).summary and len(description) > 20, name


@pytest.mark.parametrize("name", sorted(__import__("ipasdctl.methods", fromlist=["METHODS"]).METHODS.names()))
def test_every_registered_method_declares_a_one_line_summary(name):
    from ipasdctl.methods import METHODS

    summary = METHODS.get(name).summary
    assert summary and "\n" not in summary and len(summary) <= 100, name


COMPUTING = ("train", "compare", "tune", "prune", "eval", "calibrate", "export", "bench", "report", "predict")


def test_every_command_that_computes_takes_threads():
    commands = typer.main.get_command(app).commands
    for name in COMPUTING:
        options = {opt for param in commands[name].params for opt in param.opts}
        assert "--threads" in options, name


def test_a_bad_thread_count_is_one_line_before_a_chain_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "1", "--out", str(tmp_path / "runs"), "export", "--threads", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: --threads must be from 1 to ")
    assert not (tmp_path / "runs").exists()


def test_threads_reach_torch_onnxruntime_and_summary_json(tmp_path, capsys):
    import torch

    from ipasdctl import runtime
    from ipasdctl.deploy.onnx_files import ort_session

    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--method", "ce", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "-q",
                  "--set", "data.train_subset=32", "--threads", "1", "--out", str(tmp_path),
                  "export", "--out", str(tmp_path / "exports")])
        assert exit_info.value.code == 0
        run_dir = next(p for p in tmp_path.iterdir() if (p / "summary.json").is_file())
        assert json.loads((run_dir / "summary.json").read_text())["threads"] == 1
        assert torch.get_num_threads() == 1 and runtime.requested_threads() == 1
        model = next((tmp_path / "exports").glob("*.onnx"))
        assert ort_session(model).get_session_options().intra_op_num_threads == 1
        assert ort_session(model, threads=2).get_session_options().intra_op_num_threads == 2  # bench's own count
    finally:
        runtime._requested_threads = None
        torch.set_num_threads(before)
    capsys.readouterr()
