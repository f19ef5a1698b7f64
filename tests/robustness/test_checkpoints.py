"""Hostile checkpoints: pickled code refused unrun (weights-only loading), torn, foreign, hand-made,
inflating or non-finite files, a checkpoint from another architecture or behind metrics.csv, the RNG snapshot
round trip. Each is one line for every command that reads it.
"""

from __future__ import annotations

import pickle
import random
import shutil
import time

import numpy as np
import onnx
import pytest
import torch

from ipasdctl import runtime, training
from ipasdctl.cli import main
from ipasdctl.errors import UserError
from ipasdctl.safe_io import load_checkpoint, save_checkpoint
from ipasdctl.runs import load_model as load_run_model
from ipasdctl.training import train
from tests.helpers import cli_error, copy_run, only_line, Payload, picture, snapshot, SystemPayload, tiny_cifar_args, train_ok
from tests.robustness.fuzz_loaders import inflate_record


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "started"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    line = cli_error(["train", "--resume", str(run_dir)], capsys)
    assert "has no checkpoints/last.pt (the run stopped before its first checkpoint); start a new run" in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_data_whose_class_count_disagrees_with_the_checkpoint(finished_run, tmp_path, capsys):
    finished, root = finished_run
    # a finished run resumes without loading its data ("already finished"): take one that crashed after its
    # last checkpoint, before summary.json, which --resume completes and so loads the data for
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "summary.json").unlink()
    before = snapshot(run_dir)
    meta = root / "cifar-10-batches-py" / "batches.meta"
    original = meta.read_bytes()
    meta.write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(12)]}, protocol=2))
    try:
        line = cli_error(["train", "--resume", str(run_dir)], capsys)
    finally:
        meta.write_bytes(original)
    assert "the checkpoint has 10 classes but data set 'cifar10' has 12" in line
    assert snapshot(run_dir) == before


def test_a_checkpoint_with_nan_weights_is_one_line_for_eval_and_export(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    path = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(path)
    state["model"][next(k for k, v in state["model"].items() if v.is_floating_point())].fill_(float("nan"))
    save_checkpoint(path, state)
    assert "holds non-finite weights" in cli_error(["eval", str(run_dir), "--device", "cpu"], capsys)
    assert "holds non-finite weights" in cli_error(["export", str(run_dir), "--onnx", "--out", str(tmp_path / "x")],
                                                 capsys)


def test_resume_with_a_checkpoint_copied_from_another_arch_is_refused(finished, tiny_cifar, tmp_path, capsys):
    other_out = tmp_path / "other"
    train_ok(tiny_cifar_args(tiny_cifar, other_out, "--epochs", "1", "--arch", "resnet20", "--name", "o",
                       "--set", "data.train_subset=16"))
    run_dir = copy_run(finished, tmp_path / "run")
    shutil.copy(other_out / "o" / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt")
    before = snapshot(run_dir)
    line = cli_error(["train", "--resume", str(run_dir)], capsys)
    assert "config.yaml disagrees with the recipe in checkpoints/last.pt (" in line and "model.arch" in line
    assert snapshot(run_dir) == before


def test_resume_with_metrics_ahead_of_the_checkpoint_is_refused(finished, tmp_path, capsys):
    """A last.pt older than the run (copied back from elsewhere) would rewrite metrics.csv shorter."""
    run_dir = copy_run(finished, tmp_path / "run")
    metrics = run_dir / "metrics.csv"
    metrics.write_text(metrics.read_text() + metrics.read_text().splitlines()[-1] + "\n")
    before = snapshot(run_dir)
    line = cli_error(["train", "--resume", str(run_dir)], capsys)
    assert "metrics.csv records 2 epochs but checkpoints/last.pt only 1" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("payload_class", [Payload, SystemPayload])
def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, payload_class):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": payload_class(marker)}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "not a weights-only checkpoint;" in message and "\n" not in message
    assert ("open" in message) if payload_class is Payload else ("system" in message)
    assert not marker.exists()


def test_every_command_path_refuses_the_planted_checkpoint(tmp_path, capsys):
    """`train --resume` and load_run_model (eval/export/bench) read checkpoints through load_checkpoint."""
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        torch.save({"model": {}, "config": {}, "x": Payload(marker)}, run_dir / "checkpoints" / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run_dir)])
    assert exit_info.value.code == 2
    assert "not a weights-only checkpoint;" in only_line(capsys.readouterr().err)
    with pytest.raises(UserError, match="not a weights-only checkpoint;"):
        load_run_model(run_dir, "best")
    assert not marker.exists()
    assert not (run_dir / ".lock").exists()


def test_a_real_checkpoint_round_trips_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3, 3)}, "rows": [{"epoch": 1, "lr": 0.1}], "rng": runtime.rng_state(),
             "best": {"top1": 12.5}, "names": ["a", "b"]}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["rows"] == state["rows"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_torn_or_foreign_checkpoint_is_one_line(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50, "empty": b""}[damage])
    with pytest.raises(UserError, match="is not a readable checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_rng_snapshot_restores_python_numpy_and_torch(tmp_path):
    runtime.seed_everything(123)
    random.random(), np.random.rand(3), torch.rand(3)  # move every generator off its seed
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "rng": runtime.rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    runtime.seed_everything(999)
    runtime.set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == expected


def first_float_weight(state):
    return next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() > 1)


DAMAGES = {
    # damage: (change of the state, expected part of the line of eval/export, of resume)
    "no-config": (lambda s: s.pop("config"), "holds no recipe ('config')", "holds no recipe ('config')"),
    "no-num-classes": (lambda s: s.pop("num_classes"), "'num_classes' is None", "'num_classes' is None"),
    "epoch-not-integer": (lambda s: s.update(epoch=1.5), "'epoch' is 1.5, not a whole number", "'epoch' is 1.5"),
    "wrong-shape": (lambda s: s["model"].update({first_float_weight(s): torch.zeros(1)}),
                    "does not hold the weights of a resnet8 with 10 classes", "is not a complete training checkpoint"),
    "other-class-count": (lambda s: s.update(num_classes=7, class_names=[f"c{i}" for i in range(7)]),
                          "does not hold the weights of a resnet8 with 7 classes", "the checkpoint has 7 classes"),
    "missing-key": (lambda s: s.pop("optimizer"), None, "is not a complete training checkpoint of this recipe (KeyError: 'optimizer')"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_hand_made_checkpoints_are_one_line_for_eval_export_and_resume(damage, finished, tmp_path, capsys):
    change, for_model, for_resume = DAMAGES[damage]
    run_dir = copy_run(finished, tmp_path / "run")
    for which in ("best", "last"):
        path = run_dir / "checkpoints" / f"{which}.pt"
        state = load_checkpoint(path)
        change(state)
        save_checkpoint(path, state)
    if for_model is not None:
        assert for_model in cli_error(["eval", str(run_dir), "--device", "cpu"], capsys)
        assert for_model in cli_error(["export", str(run_dir), "--onnx", "--out", str(tmp_path / "x")], capsys)
    assert for_resume in cli_error(["train", "--resume", str(run_dir)], capsys)


def test_a_checkpoint_that_inflates_far_beyond_its_size_is_refused_unread(demo_run, tmp_path, capsys):
    run_dir = copy_run(demo_run, tmp_path / "run")
    best = run_dir / "checkpoints" / "best.pt"
    inflate_record(best, 64 << 20)  # 64 MiB of zeros, deflated to ~64 kB
    assert best.stat().st_size < (64 << 20) // 50
    started = time.monotonic()
    for args in (["eval", str(run_dir), "--device", "cpu"], ["predict", str(run_dir), str(picture(tmp_path / "a.png"))]):
        line = cli_error(args, capsys)
        assert f"{best} is not a checkpoint ipasdctl wrote: its zip records inflate to 6" in line
        assert "beyond the bound of 2 x the file size + 1 MiB" in line and "refused unread" in line
    assert time.monotonic() - started < 30
