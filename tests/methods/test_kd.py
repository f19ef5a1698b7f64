"""kd (Hinton et al. 2015): its loss against the formula on hand-made logits; the teacher frozen, in eval mode,
its cost in summary.json; `compare --baseline-set kd.teacher=RUN` and the table's teacher rows; bad teachers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ipasdctl.cli import main
from ipasdctl.methods import MethodContext, build_method
from ipasdctl.methods.kd import kd_loss
from tests.helpers import cli_error as one_error_line

TINY = ["--recipe", "demo", "--epochs", "1", "--batch-size", "32", "--set", "data.train_subset=64", "-q"]


def run_cli(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)


def test_kd_loss_is_the_formula_on_a_hand_made_example():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    teacher = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 2])
    T, a = 2.0, 0.7
    ce = sum(-math.log(math.exp(student[i, labels[i]]) / sum(math.exp(v) for v in student[i])) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        t = [math.exp(v / T) for v in teacher[i].tolist()]
        t = [v / sum(t) for v in t]
        s = [math.exp(v / T) for v in student[i].tolist()]
        s = [v / sum(s) for v in s]
        kl += sum(tc * math.log(tc / sc) for tc, sc in zip(t, s)) / 2
    out = kd_loss(student, teacher, labels, a, T)
    assert out["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss_kd"].item() == pytest.approx(T * T * kl, rel=1e-5)
    assert out["loss"].item() == pytest.approx((1 - a) * ce + a * T * T * kl, rel=1e-5)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_cli(["train", *TINY, "--arch", "resnet20", "--method", "ce", "--out", str(out), "--name", "teacher"])
    return out / "teacher"


def context(num_classes=10):
    return MethodContext(num_classes=num_classes, num_train=8, train_labels=torch.zeros(8, dtype=torch.long),
                         embed_dim=8, stage_channels=[4, 8], epochs=1, batch_size=4, seed=0,
                         device=torch.device("cpu"), image_shape=(3, 16, 16))


def test_the_teacher_is_frozen_in_eval_mode_and_its_cost_counted(teacher_run):
    method = build_method({"name": "kd", "teacher": str(teacher_run)}, context())
    assert not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    record = method.teacher_record()
    assert record["teacher_arch"] == "resnet20" and record["teacher_params"] == sum(
        p.numel() for p in method.teacher.parameters())
    assert record["teacher_macs"] > 0


def test_kd_trains_and_compare_marks_the_teacher_rows(teacher_run, tmp_path):
    out = tmp_path / "cmp"
    run_cli(["compare", *TINY, "--method", "ce", "--baselines", "kd", "--seeds", "0", "--out", str(out),
             "--baseline-set", f"kd.teacher={teacher_run}", "--baseline-set", "kd.alpha=0.5"])
    summary = json.loads((out / "kd-s0" / "summary.json").read_text())
    assert summary["teacher"] == str(teacher_run) and summary["teacher_arch"] == "resnet20"
    assert summary["teacher_params"] > summary["params"]  # resnet20 teaching resnet8
    config = (out / "kd-s0" / "config.yaml").read_text()
    assert "alpha: 0.5" in config
    table = (out / "summary.md").read_text()
    assert "`kd` (teacher)" in table and "teacher resnet20" in table
    assert "`ce` (teacher)" not in table


def test_bad_teachers_are_one_line(teacher_run, tmp_path, capsys):
    out = tmp_path / "runs"
    line = one_error_line(["train", *TINY, "--out", str(out), "--set", "method.name=kd", "--set",
                           f"method.teacher={teacher_run}", "--set", "data.classes=[0, 1, 2]"], capsys)
    assert "predicts 10 classes" in line and "3" in line
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "best.pt").write_bytes((teacher_run / "checkpoints" / "best.pt").read_bytes())
    line = one_error_line(["train", *TINY, "--out", str(out), "--set", "method.name=kd", "--set",
                           f"method.teacher={unfinished}"], capsys)
    assert "not a finished run" in line
    line = one_error_line(["compare", *TINY, "--baselines", "kd", "--seeds", "0", "--out", str(tmp_path / "c"),
                           "--baseline-set", "kdd.teacher=x"], capsys)
    assert "did you mean 'kd'" in line
    # compare finds an unfinished teacher before its first run (ce) trains, not when kd's run starts
    line = one_error_line(["compare", *TINY, "--baselines", "kd", "--seeds", "0", "--out", str(tmp_path / "c"),
                           "--baseline-set", f"kd.teacher={unfinished}"], capsys)
    assert f"kd.teacher={unfinished}: {unfinished} is not a finished run" in line and not (tmp_path / "c").exists()
    assert not out.exists() or not any(out.iterdir())
