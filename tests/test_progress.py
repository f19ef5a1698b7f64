"""Progress: the training bar moves every step but reads the device only every refresh_steps steps; the test
pass has its own bar; `--resume` of a finished run says so in one line and trains nothing."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from ipasdctl import training
from ipasdctl.cli import main
from ipasdctl.config import load_recipe
from ipasdctl.training import meters


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def tiny_recipe(epochs: int = 1):
    # 64 digits, batch 8: 8 steps an epoch; the test set (360 digits) at batch 100: 4 batches
    return load_recipe("demo", {"method": {"name": "ce"}, "train": {"epochs": epochs, "batch_size": 8,
                                                                     "eval_batch_size": 100, "device": "cpu"},
                                "data": {"train_subset": 64}})


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
    training.train(tiny_recipe(epochs=2), tmp_path, progress=progress)
    text = stream.getvalue()
    assert reads.count(False) == 4  # steps 4 and 8 of each epoch for the postfix; the epoch end reads over ranks
    assert test_bars == [4, 4]  # one test bar per epoch, over its 4 batches
    for step in range(1, 9):  # every step drawn, in both epochs
        assert text.count(f"| {step}/8 [") >= 2, step
    assert "epoch 2/2: 100%" in text and "test: 100%" in text and "4/4" in text
    assert "epoch 1/2  loss=" in text and "epoch 2/2  loss=" in text  # the one line per epoch, after the bars


def test_no_terminal_no_bars_but_one_line_per_epoch(tmp_path):
    stream = io.StringIO()
    training.train(tiny_recipe(epochs=2), tmp_path, progress=training.Progress(stream=stream))
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return training.train(tiny_recipe(), tmp_path_factory.mktemp("runs"), progress=training.Progress(enabled=False))


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
