"""Progress: the training bar moves every step but reads the device only every refresh_steps steps; the test
pass has its own bar; without a terminal a line comes early in each epoch; `train` ends with one summary line;
`--resume` of a finished run says so in one line and trains nothing."""

from __future__ import annotations

import io
import json
import re

import pytest
from tqdm import tqdm

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.training import meters
from tests.helpers import tiny_recipe


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def eight_steps_an_epoch(epochs: int = 1):
    """64 digits, batch 8: 8 steps an epoch; the test set (360 digits) at batch 100: 4 batches."""
    return tiny_recipe("ce", epochs=epochs, batch_size=8, train={"eval_batch_size": 100})


def test_the_bar_counts_every_step_and_reads_the_device_every_refresh_steps():
    progress = training.Progress(refresh_steps=20, stream=Terminal())
    bar = tqdm(total=45, file=progress.stream, mininterval=0)
    reads, positions = [], []

    def read_stats():
        reads.append(bar.n)
        return {"train_loss": 1.0, "loss_ce": 1.0, "train_top1": 50.0}

    for step in range(1, 46):
        progress.advance(bar, step, read_stats)
        positions.append(bar.n)
    assert positions == list(range(1, 46))  # every step, counted on the host
    assert len(reads) == 2  # steps 20 and 40 only
    assert "ce=1.000" in progress.stream.getvalue() and "45/45" in progress.stream.getvalue()


def test_training_on_a_terminal_shows_step_and_test_bars_and_the_epoch_line(tmp_path, monkeypatch):
    reads, test_bars = [], []
    real_read, real_test_bar = meters.EpochMeter.read, training.Progress.test_bar

    def counting_read(self, over_ranks=False):
        reads.append(over_ranks)
        return real_read(self, over_ranks)

    def recording_test_bar(self, batches):
        test_bars.append(batches)
        return real_test_bar(self, batches)

    monkeypatch.setattr(meters.EpochMeter, "read", counting_read)
    monkeypatch.setattr(training.Progress, "test_bar", recording_test_bar)
    stream = Terminal()
    progress = training.Progress(refresh_steps=4, stream=stream, redraw_seconds=0)  # every update drawn
    training.train(eight_steps_an_epoch(epochs=2), tmp_path, progress=progress)
    text = stream.getvalue()
    assert reads.count(False) == 4  # steps 4 and 8 of each epoch for the postfix; the epoch end reads over ranks
    assert test_bars == [4, 4]  # one test bar per epoch, over its 4 batches
    for step in range(1, 9):  # every step drawn, in both epochs
        assert text.count(f"| {step}/8 [") >= 2, step
    assert "epoch 2/2: 100%" in text and "test: 100%" in text and "4/4" in text
    assert "epoch 1/2  loss=" in text and "epoch 2/2  loss=" in text  # the one line per epoch, after the bars


def test_no_terminal_no_bars_but_one_line_per_epoch(tmp_path):
    stream = io.StringIO()
    # an epoch shorter than first_line_seconds (an hour here, whatever the machine's load) has its line only
    training.train(eight_steps_an_epoch(epochs=2), tmp_path, progress=training.Progress(stream=stream, first_line_seconds=3600))
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return training.train(eight_steps_an_epoch(), tmp_path_factory.mktemp("runs"), progress=training.Progress(enabled=False))


def test_resume_of_a_finished_run_says_so_in_one_line_and_trains_nothing(finished_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(finished_run)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0
    assert captured.out.strip() == str(finished_run)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "already finished (1/1 epochs" in lines[0] and "nothing to resume" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(finished_run), "-q"])
    assert capsys.readouterr().err == ""


def test_no_terminal_a_line_comes_early_in_each_epoch_not_only_at_its_end(tmp_path):
    stream = io.StringIO()
    progress = training.Progress(stream=stream, first_line_seconds=0.0, line_seconds=3600.0)
    training.train(eight_steps_an_epoch(epochs=2), tmp_path, progress=progress)
    lines = stream.getvalue().splitlines()
    # the first step of each epoch is past first_line_seconds (0 here; seconds in real use), the next line an
    # hour away: one step line, then the epoch's own line
    assert [line.split(":")[0] if ": step" in line else line.split()[1] for line in lines] == \
        ["epoch 1/2", "1/2", "epoch 2/2", "2/2"]
    step_line = lines[0]
    assert re.fullmatch(r"epoch 1/2: step 1/8 \(12 %\), \d+ s  loss=\d\.\d{3} ce=\d\.\d{3} acc=\d+\.\d", step_line), step_line


def test_train_ends_with_one_summary_line_and_the_run_folder_on_stdout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "ce", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
              "--set", "data.train_subset=64", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    run_dir = captured.out.strip()
    summary = json.loads((tmp_path / run_dir.rsplit("/", 1)[1] / "summary.json").read_text())
    last = captured.err.strip().splitlines()[-1]
    assert exit_info.value.code == 0 and last.startswith("finished in ") and last.endswith(f"; {run_dir}")
    assert f"best-epoch top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']} of 2, chosen on test)" in last
    assert f"last-epoch {summary['last_top1']:.2f}%" in last
    with pytest.raises(SystemExit):  # -q: nothing on stderr, the run folder still on stdout
        main(["train", "--method", "ce", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
              "--set", "data.train_subset=64", "--out", str(tmp_path), "-q"])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip().startswith(str(tmp_path))


def test_run_durations_read_as_seconds_minutes_or_hours():
    assert [training.progress.duration(s) for s in (0.4, 41, 99.6, 725, 12000)] == \
        ["0 s", "41 s", "1 min 40 s", "12 min 05 s", "3 h 20 min"]
