"""PS-KD: progressive self-knowledge distillation (Kim, Ji, Yoon, Hwang, "Self-Knowledge Distillation with
Progressive Refinement of Targets", ICCV 2021; release: lgcnsai/PS-KD-Pytorch, also winycg/Self-KD-Lib).

With P[i] the softmax the model gave sample i the last time it was trained on (the previous epoch):
    alpha_e = alpha_T (e + 1) / E,   q_i = (1 - alpha_e) onehot(y_i) + alpha_e P[i]
    loss = -mean_i sum_c q_ic log softmax(z_i)_c,   then P[i] <- softmax(z_i) (detached)
Epoch 0 uses one-hot targets whatever the memory holds (the release overwrites the rows with one-hot labels
in epoch 0), so epoch 0 is plain cross-entropy. No cap on alpha (unlike IPASD): it reaches alpha_T in the
last epoch. P is a SampleMemory (the per-sample table IPASD uses), float16 by default instead of the
release's float32 host tensor, on the training device, saved in the checkpoint. Default alpha_T = 0.8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import param
from .base import METHODS, Method, MethodContext, StepResult
from .losses import soft_cross_entropy
from .memory import DTYPES, SampleMemory


@dataclass
class PSKDParams:
    alpha_T: float = param(0.8, ge=0, le=1, tune=(0.1, 0.95))
    memory_dtype: str = param("float16", choices=DTYPES)  # float32 | float16 | bfloat16 | uint8


def pskd_alpha(epoch: int, epochs: int, alpha_T: float) -> float:
    """alpha_e = alpha_T (e + 1) / E, e counted from 0."""
    return alpha_T * (epoch + 1) / epochs


def pskd_loss(logits: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cross-entropy against (1 - alpha) onehot(y) + alpha * previous (rows of the memory)."""
    logits = logits.float()
    target = (1.0 - alpha) * F.one_hot(labels, logits.shape[1]).float() + alpha * previous
    return soft_cross_entropy(logits, target)


@METHODS.register
class PSKD(Method):
    name = "ps-kd"
    summary = "progressive self-KD from the model's own last-epoch predictions (Kim et al. 2021)"
    Params = PSKDParams

    def __init__(self, params: PSKDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        onehot = F.one_hot(ctx.train_labels, ctx.num_classes).float()
        self.last_softmax = SampleMemory(ctx.num_train, ctx.num_classes, params.memory_dtype, ctx.device, onehot,
                                         ctx.collectives)

    def loss(self, net, batch) -> StepResult:
        out = net(batch.images)
        logits, idx, labels = out["logits"], batch.indices, batch.labels
        if batch.epoch == 0:
            previous = F.one_hot(labels, self.ctx.num_classes).float()
        else:
            previous = self.last_softmax.read(idx)
        alpha = pskd_alpha(batch.epoch, self.ctx.epochs, self.params.alpha_T)
        loss = pskd_loss(logits, labels, previous, alpha)
        self.last_softmax.write(idx, F.softmax(logits.detach().float(), dim=1))
        return StepResult(loss, logits, labels, {"loss_pskd": loss, "alpha": loss.new_full((), alpha)})

    def state_dict(self) -> dict:
        return {"last_softmax": self.last_softmax.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_softmax.load_state_dict(state["last_softmax"])
