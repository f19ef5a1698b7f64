"""Teacher-free knowledge distillation, Tf-KD (Yuan, Tay, Li, Wang, Feng, "Revisiting Knowledge Distillation via
Label Smoothing Regularization", CVPR 2020; release: yuanli2333/Teacher-free-Knowledge-Distillation).

Both variants follow the release's `my_loss_function.py`, whose KL is `nn.KLDivLoss()` with its default
reduction: the mean over all N x K elements, i.e. the batch-mean KL divided by K. The `multiplier` m of the
authors' configs makes up for that, so the effective weight of the KL is m / K times the textbook one.

tf-kd-reg (a virtual teacher): u = 0.99 on y and 0.01 / (K - 1) elsewhere, a teacher q = softmax(u / T)
(the softmax of a probability vector, as the release computes it: at T = 20 it is close to uniform),
    loss = (1 - a) CE(z, y) + a * m * (1 / NK) sum_ic q_ic log(q_ic / softmax(z_i)_c)
Reading of the spec's "KL(softmax(u/T) || p_T)-style term": the release does not soften the student
(log_softmax(z), no T); `soften_student=true` uses log_softmax(z / T) as the paper's equation writes it.
Defaults: the authors' CIFAR-100 ResNet-18 config (base_resnet18/params.json): a 0.1, T 20, m 100.

tf-kd-self (a pretrained teacher of the same architecture, `--set method.teacher=RUN_FOLDER`):
    loss = (1 - a) CE(z, y) + a * T^2 * m * (1 / NK) sum_ic t_ic log(t_ic / s_ic),  t = softmax(z_teacher / T),
    s = softmax(z / T)
Defaults: the authors' ResNet-18 self-teacher config (resnet18_self_teacher/params.json): a 0.95, T 6, m 50;
on CIFAR-100 (K = 100) that is half the textbook a T^2 KL(t || s); m = K gives the textbook weight.
The teacher is the best checkpoint of a finished run, loaded weights-only, frozen, in eval mode, outside the
trained network and the optimizer, and evaluated under no_grad. Any architecture with the same number of
classes is accepted (another architecture makes it plain KD); Tf-KD-self means the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..params import param
from ..runs import load_model
from .base import METHODS, Method, MethodContext, StepResult

CORRECT_PROB = 0.99  # the virtual teacher's probability on the label (fixed in the release)


@dataclass
class TfKDRegParams:
    alpha: float = param(0.1, ge=0, le=1, tune=(0.05, 0.95))
    temperature: float = param(20.0, gt=0, tune=(1.0, 40.0), log=True)
    multiplier: float = param(100.0, ge=0)
    soften_student: bool = False  # true: log_softmax(z / T) on the student side (the paper's equation)


@dataclass
class TfKDSelfParams:
    teacher: Optional[str] = None  # run folder of a finished training run (its checkpoints/best.pt)
    alpha: float = param(0.95, ge=0, le=1, tune=(0.05, 0.95))
    temperature: float = param(6.0, gt=0, tune=(1.0, 20.0), log=True)
    multiplier: float = param(50.0, ge=0)


def elementwise_mean_kl(teacher_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """sum_ic t_ic (log t_ic - log s_ic) / (N K): torch's KLDivLoss with reduction='mean' (0 log 0 = 0)."""
    pointwise = torch.special.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs
    return pointwise.sum() / pointwise.numel()


def virtual_teacher(labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """softmax(u / T), u = 0.99 on the label and 0.01 / (K - 1) elsewhere."""
    onehot = F.one_hot(labels, num_classes).float()
    u = onehot * CORRECT_PROB + (1.0 - onehot) * ((1.0 - CORRECT_PROB) / (num_classes - 1))
    return F.softmax(u / temperature, dim=1)


def tf_kd_reg_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float,
                   multiplier: float, soften_student: bool = False) -> dict:
    logits = logits.float()
    teacher = virtual_teacher(labels, logits.shape[1], temperature)
    student = F.log_softmax(logits / temperature if soften_student else logits, dim=1)
    loss_kd = multiplier * elementwise_mean_kl(teacher, student)
    loss_ce = F.cross_entropy(logits, labels)
    return {"loss": (1.0 - alpha) * loss_ce + alpha * loss_kd, "loss_ce": loss_ce, "loss_kd": loss_kd}


def tf_kd_self_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                    temperature: float, multiplier: float) -> dict:
    logits = logits.float()
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    student = F.log_softmax(logits / temperature, dim=1)
    loss_kd = temperature ** 2 * multiplier * elementwise_mean_kl(teacher, student)
    loss_ce = F.cross_entropy(logits, labels)
    return {"loss": (1.0 - alpha) * loss_ce + alpha * loss_kd, "loss_ce": loss_ce, "loss_kd": loss_kd}


@METHODS.register
class TfKDReg(Method):
    name = "tf-kd-reg"
    summary = "teacher-free KD from a virtual teacher (Yuan et al. 2020)"
    Params = TfKDRegParams

    def __init__(self, params: TfKDRegParams, ctx: MethodContext):
        super().__init__(params, ctx)
        if ctx.num_classes < 2:
            raise UserError("tf-kd-reg needs at least 2 classes")

    def loss(self, net, batch) -> StepResult:
        logits = net(batch.images)["logits"]
        p = self.params
        result = tf_kd_reg_loss(logits, batch.labels, p.alpha, p.temperature, p.multiplier, p.soften_student)
        return StepResult.of(result, logits, batch.labels)


def load_teacher(run_dir: Optional[str], num_classes: int, device, channels_last: bool = False) -> torch.nn.Module:
    """The frozen, eval-mode best model of a finished run; a UserError for anything unusable."""
    if not run_dir:
        raise UserError("method tf-kd-self needs a teacher: train one first (e.g. `ipasdctl train --set "
                        "method.name=ce`), then pass its run folder with --set method.teacher=RUN_FOLDER")
    if not Path(run_dir).is_dir():
        raise UserError(f"method.teacher={run_dir}: no such run folder; give the folder of a finished "
                        "`ipasdctl train` run")
    model, state, _ = load_model(Path(run_dir), "best", str(device))
    if int(state["num_classes"]) != num_classes:
        raise UserError(f"method.teacher={run_dir} has {state['num_classes']} classes but this data set has "
                        f"{num_classes}; use a teacher trained on the same data set")
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@METHODS.register
class TfKDSelf(Method):
    name = "tf-kd-self"
    summary = "teacher-free KD from a trained run of the same architecture, method.teacher (Yuan et al. 2020)"
    Params = TfKDSelfParams
    reference_run_param = "teacher"  # `compare` gives it the ce run of the same seed

    def __init__(self, params: TfKDSelfParams, ctx: MethodContext):
        super().__init__(params, ctx)
        # a plain attribute, not a submodule of the training network: never trained, never exported
        self.teacher = load_teacher(params.teacher, ctx.num_classes, ctx.device, ctx.channels_last)

    def loss(self, net, batch) -> StepResult:
        logits = net(batch.images)["logits"]
        with torch.no_grad():
            teacher_logits = self.teacher(batch.images)
        p = self.params
        result = tf_kd_self_loss(logits, teacher_logits, batch.labels, p.alpha, p.temperature, p.multiplier)
        return StepResult.of(result, logits, batch.labels)
