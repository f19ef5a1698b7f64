"""KD: knowledge distillation from a trained teacher of any architecture (Hinton, Vinyals, Dean, "Distilling the
Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop, arXiv:1503.02531, 2015).

    loss = (1 - a) CE(z, y) + a T^2 mean_i KL(softmax(z_t,i / T) || softmax(z_i / T))     (losses.distill_kl)

z the student's logits, z_t the teacher's. Defaults as the field uses them on CIFAR (the CRD benchmark,
HobbitLong/RepDistiller, and torchdistill's KD configs): T = 4, a = 0.9.

`method.teacher`: the folder of a finished `ipasdctl train` run (RUN for its best checkpoint, RUN:last), or a
weights spec as `model.weights` takes (a .safetensors / .pt file, torchvision[:ENUM], timm[:TAG]) together with
`method.teacher_arch`. The teacher must predict the student's classes. It runs frozen, in eval mode, on the
training device, in the memory layout of the batches, inside the trainer's autocast (the same precision as the
student), under no_grad; it is a plain attribute, not a submodule, so it is never trained, checkpointed or
exported. Its parameters and MACs per image are recorded in summary.json (the extra compute of every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models import build_model, count_macs, count_params
from ..params import param
from ..runs import load_model
from ..runs.weights import load_weights, require_finished, split_run_spec
from .base import METHODS, Method, MethodContext, StepResult
from .losses import distill_kl


@dataclass
class KDParams:
    teacher: Optional[str] = None  # a finished run folder (RUN, RUN:last) or a weights spec (with teacher_arch)
    teacher_arch: Optional[str] = None  # the teacher's architecture when `teacher` is a weights spec
    alpha: float = param(0.9, ge=0, le=1)
    temperature: float = param(4.0, gt=0)


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float) -> dict:
    loss_ce = F.cross_entropy(logits.float(), labels)
    loss_kd = distill_kl(logits, teacher_logits, temperature)
    return {"loss": (1.0 - alpha) * loss_ce + alpha * loss_kd, "loss_ce": loss_ce, "loss_kd": loss_kd}


def load_kd_teacher(params: KDParams, ctx: MethodContext) -> tuple[torch.nn.Module, str]:
    """(the frozen eval-mode teacher on the training device, its architecture); a UserError for anything unusable."""
    spec = params.teacher
    if not spec:
        raise UserError("method kd needs a teacher: train one first (e.g. `ipasdctl train --arch resnet56 --set "
                        "method.name=ce`), then pass its run folder with --set method.teacher=RUN_FOLDER")
    run = split_run_spec(spec)
    if run is not None:
        folder, which = run
        require_finished(folder, f"method.teacher={spec}")
        model, state, recipe = load_model(folder, which, str(ctx.device))
        arch, classes = state.get("arch", recipe.model.arch), int(state["num_classes"])
        if classes != ctx.num_classes:
            raise UserError(f"method.teacher={spec} predicts {classes} classes but the student's data has "
                            f"{ctx.num_classes}; use a teacher trained on the same classes")
    else:
        arch = params.teacher_arch
        if not arch:
            raise UserError(f"method.teacher={spec} is not a run folder; for a weights file or a zoo's weights, also "
                            "set method.teacher_arch=ARCH (the architecture they belong to)")
        model = build_model(arch, ctx.num_classes)
        loaded = load_weights(model, spec, arch)
        if loaded.reinitialised:
            raise UserError(f"method.teacher={spec}: its classifier does not predict the student's {ctx.num_classes} "
                            "classes; a teacher must be trained (or fine-tuned) on the same classes")
    model = model.to(ctx.device).eval()
    model.requires_grad_(False)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, arch


@METHODS.register
class KD(Method):
    name = "kd"
    summary = "knowledge distillation from a frozen teacher of any architecture (Hinton et al. 2015)"
    Params = KDParams
    reference_run_param = "teacher"  # `compare` gives it the ce run of the same seed unless one is set

    def __init__(self, params: KDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.teacher, self.teacher_arch = load_kd_teacher(params, ctx)
        self.teacher_macs = count_macs(self.teacher, ctx.image_shape, ctx.device) if ctx.image_shape else None

    def loss(self, net, batch) -> StepResult:
        logits = net(batch.images)["logits"]
        with torch.no_grad():
            teacher_logits = self.teacher(batch.images)
        result = kd_loss(logits, teacher_logits, batch.labels, self.params.alpha, self.params.temperature)
        return StepResult.of(result, logits, batch.labels)

    def teacher_record(self) -> dict:
        return {"teacher": self.params.teacher, "teacher_arch": self.teacher_arch,
                "teacher_params": count_params(self.teacher), "teacher_macs": self.teacher_macs}
