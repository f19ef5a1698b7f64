"""Parameter bounds declared on the fields of a Params (params.py), a method's StepResult, and the losses several
methods share (methods/losses.py), each against its formula on a hand-made example."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from ipasdctl.errors import UserError
from ipasdctl.methods import StepResult, method_class
from ipasdctl.methods.losses import non_target_columns, soft_cross_entropy
from ipasdctl.params import Declared, check_declared, declarations, param
from ipasdctl.training.meters import EpochMeter

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ declared bounds


@dataclass
class Example:
    T: float = param(4.0, gt=0, tune=(1.0, 8.0))
    eps: float = param(0.1, ge=0, lt=1)
    weight: float = param(1.0, ge=0)
    size: Optional[int] = param(None, ge=8, le=4096)
    kind: str = param("a", choices=("a", "b"))
    free: float = 2.0
    lr: float = param(0.1, gt=0, tune=(1e-3, 1.0), log=True)


@pytest.mark.parametrize("field, value, message", [
    ("T", 0.0, "x.T must be positive, got 0.0"),
    ("eps", 1.0, "x.eps must be in [0, 1), got 1.0"),
    ("eps", -0.1, "x.eps must be in [0, 1), got -0.1"),
    ("weight", -1.0, "x.weight must not be negative, got -1.0"),
    ("size", 4097, "x.size must be in [8, 4096], got 4097"),
    ("kind", "c", "x.kind must be one of a, b, got 'c'"),
    ("T", math.nan, "x.T must be positive, got nan"),
])
def test_a_declared_bound_is_checked_with_one_line(field, value, message):
    check_declared(Example(), "x")  # the defaults hold
    with pytest.raises(UserError) as info:
        check_declared(dataclasses.replace(Example(), **{field: value}), "x")
    assert str(info.value) == message


def test_edges_of_a_bound_and_unset_optionals_pass():
    check_declared(Example(eps=0.0, size=8, weight=0.0, kind="b"), "x")
    check_declared(Example(size=4096, free=-5.0), "x")  # an undeclared field is not checked
    check_declared(Example(size=None), "x")


def test_the_declaration_carries_a_tuning_range_and_log_scale():
    declared = dict(declarations(Example))
    assert declared["T"] == Declared(gt=0, tune=(1.0, 8.0)) and not declared["T"].log
    assert declared["lr"].tune == (1e-3, 1.0) and declared["lr"].log
    assert "free" not in declared
    with pytest.raises(ValueError, match="log-scale"):
        param(1.0, tune=(0.0, 1.0), log=True)


def test_every_method_declares_its_simple_bounds_and_parsing_checks_them():
    bounded = {("ipasd", "tau"), ("ipasd", "w_con"), ("ls", "eps"), ("ps-kd", "alpha_T"), ("cs-kd", "T"),
               ("dlb", "T"), ("byot", "T"), ("dks", "T"), ("ddgsd", "mmd"), ("tf-kd-reg", "temperature"),
               ("tf-kd-self", "multiplier"), ("zipf-ls", "upsample"), ("ipasd", "memory_dtype")}
    for method, field in bounded:
        assert field in dict(declarations(method_class(method).Params)), (method, field)
    with pytest.raises(UserError, match="method.w_con must not be negative, got -1.0"):
        method_class("ipasd").parse_params({"w_con": -1})
    with pytest.raises(UserError, match="method.memory_dtype must be one of float32, float16, bfloat16, uint8"):
        method_class("ps-kd").parse_params({"memory_dtype": "int4"})


# ------------------------------------------------------------------------------------------------ StepResult, losses


def test_a_step_result_from_a_loss_dict_and_the_meter_counting_its_own_labels():
    loss = torch.tensor(2.0, requires_grad=True)
    result = StepResult.of({"loss": loss, "loss_ce": torch.tensor(1.5), "loss_kd": torch.tensor(0.5)},
                           torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert result.loss is loss and list(result.terms) == ["loss_ce", "loss_kd"]
    meter = EpochMeter(CPU)
    meter.update(result, step=0)
    values = meter.read()
    # two samples: the first right, the second wrong, counted against the result's labels
    assert values == {"train_loss": 2.0, "loss_ce": 1.5, "loss_kd": 0.5, "train_top1": 50.0}


def test_soft_cross_entropy_matches_its_formula():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    target = torch.tensor([[0.2, 0.7, 0.1], [0.0, 0.5, 0.5]])
    expected = 0.0
    for row, q in zip(logits.tolist(), target.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        expected -= sum(qc * (v - log_z) for qc, v in zip(q, row)) / 2
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    hard = F.one_hot(torch.tensor([1, 2]), 3).float()
    assert soft_cross_entropy(logits, hard).item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1, 2])).item())


def test_non_target_columns_skip_each_rows_label():
    assert non_target_columns(torch.tensor([0, 2, 1]), 4).tolist() == [[1, 2, 3], [0, 1, 3], [0, 2, 3]]
