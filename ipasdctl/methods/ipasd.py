"""IPASD: intra-class progressive and adaptive self-distillation.

Gou, Lin, Li, Ou, Yu, Yi, Neural Networks 188 (2025) 107404, doi:10.1016/j.neunet.2025.107404.

With memories S[i] (last prototype prediction), L[i] (last softmax) and prototypes P of the previous epoch:
    w_S = a_S / (a_S + a_L)  (a_X: samples of the batch whose argmax X[i] is y_i; 0/0 -> 1/2)
    q_i = (1 - alpha_e) onehot(y_i) + alpha_e (w_S S[i] + w_L L[i]),  alpha_e = w_div min((e+1)/E, 0.8)
    loss = -mean_i sum_c q_ic log softmax(z_i)_c  +  w_con CE(cos(g_i, P) / tau, y_i)   (second term from epoch 1)
Fixes over the authors' release: the compactness term has its gradient (con_grad=false restores the
release's detached, inert term for comparison), the 0/0 blend guard, detached prototype accumulation,
memories and prototypes as device tensors in the training state (and the checkpoint), no per-sample loops.
Several processes (training/distributed.py, through the context's collectives): the memories stay what one process holds (every rank writes its rows
everywhere), the prototypes are summed over ranks, and a_S, a_L are counted per rank sub-batch, as the
single-process method counts them per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..params import param
from .base import METHODS, Collectives, Method, MethodContext, StepResult
from .losses import soft_cross_entropy
from .memory import DTYPES, SampleMemory


@dataclass
class IPASDParams:
    w_div: float = param(0.8, ge=0, tune=(0.2, 1.0))
    w_con: float = param(0.01, ge=0, tune=(1e-3, 0.3), log=True)
    tau: float = param(0.3, gt=0, tune=(0.05, 1.0), log=True)
    con_grad: bool = True  # false: the release's detached contrastive term (no gradient), for ablation
    memory_dtype: str = param("float16", choices=DTYPES)  # float32 | float16 | bfloat16 | uint8


def progressive_alpha(epoch: int, epochs: int, w_div: float) -> float:
    """alpha_e = w_div (e+1)/E while e < 0.8 E, then w_div * 0.8."""
    if epoch < 0.8 * epochs:
        return w_div * (epoch + 1) / epochs
    return w_div * 0.8


def blend_weights(labels: torch.Tensor, s_rows: torch.Tensor, l_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_S, w_L) from how many of the batch each memory classifies correctly; 1/2 each when both miss all."""
    correct_s = (s_rows.argmax(1) == labels).sum().float()
    correct_l = (l_rows.argmax(1) == labels).sum().float()
    total = correct_s + correct_l
    safe_total = total.clamp_min(1.0)
    w_s = torch.where(total > 0, correct_s / safe_total, torch.full_like(total, 0.5))
    return w_s, 1.0 - w_s


def prototype_logits(embedding: torch.Tensor, prototypes: torch.Tensor, tau: float) -> torch.Tensor:
    """cos(g_i, P_c) / tau for every class c (prototypes are not assumed normalised), in float32 even under
    autocast: a bf16 matmul here flips the argmax of prototype predictions, which feed the blend weights."""
    with torch.autocast(embedding.device.type, enabled=False):
        g = F.normalize(embedding.float(), dim=1)
        return g @ F.normalize(prototypes.float(), dim=1).t() / tau


def ipasd_loss(logits: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor,
               s_rows: torch.Tensor, l_rows: torch.Tensor, prototypes: Optional[torch.Tensor],
               alpha: float, w_con: float, tau: float, con_grad: bool = True) -> dict:
    """The loss of one batch; `prototypes` is None in epoch 0. Returns loss, terms, and the new memory rows."""
    logits = logits.float()
    num_classes = logits.shape[1]
    w_s, w_l = blend_weights(labels, s_rows, l_rows)
    teacher = w_s * s_rows + w_l * l_rows
    target = (1.0 - alpha) * F.one_hot(labels, num_classes).float() + alpha * teacher
    loss_soft = soft_cross_entropy(logits, target)
    out = {"loss_soft": loss_soft, "w_s": w_s, "alpha": torch.tensor(alpha, device=logits.device)}
    new_s = None
    if prototypes is not None:
        features = embedding if con_grad else embedding.detach()
        proto_logits = prototype_logits(features, prototypes, tau)
        loss_con = F.cross_entropy(proto_logits, labels)
        new_s = F.softmax(proto_logits.detach(), dim=1)
    else:
        loss_con = torch.zeros((), device=logits.device)
    out["loss_con"] = loss_con
    out["loss"] = loss_soft + w_con * loss_con
    out["new_l"] = F.softmax(logits.detach(), dim=1)
    out["new_s"] = new_s
    return out


class Prototypes:
    """Class means of the normalised embeddings seen in an epoch (accumulated detached, on the device).

    Several processes: each rank sums its own samples; `collectives.all_reduce_sum` sums the ranks' sums and
    counts where they are used, at the epoch's end and in a checkpoint, which therefore holds the global sums.
    A rank restoring them keeps them only if it is rank 0, so the next sum counts them once.
    """

    def __init__(self, num_classes: int, dim: int, device, collectives: Optional[Collectives] = None):
        self.sums = torch.zeros(num_classes, dim, device=device)
        self.counts = torch.zeros(num_classes, device=device)
        self.current = torch.zeros(num_classes, dim, device=device)  # P(e-1), in use this epoch
        self.ready = False  # no prototypes during epoch 0
        self.collectives = collectives or Collectives()

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def accumulate(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        g = F.normalize(embedding.detach().float(), dim=1)
        self.sums.index_add_(0, labels, g)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    def global_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, counts) over every rank (copies when several processes; this rank's own stay as they are)."""
        if not self.collectives.enabled:
            return self.sums, self.counts
        sums, counts = self.sums.clone(), self.counts.clone()
        self.collectives.all_reduce_sum(sums, counts)
        return sums, counts

    def finish_epoch(self) -> None:
        sums, counts = self.global_sums()
        self.current = sums / counts.clamp_min(1.0).unsqueeze(1)
        self.ready = True

    def state_dict(self) -> dict:
        sums, counts = self.global_sums()
        return {"sums": sums, "counts": counts, "current": self.current, "ready": self.ready}

    def load_state_dict(self, state: dict) -> None:
        device = self.sums.device
        self.sums = state["sums"].to(device)
        self.counts = state["counts"].to(device)
        if self.collectives.rank != 0:
            self.sums.zero_()
            self.counts.zero_()
        self.current = state["current"].to(device)
        self.ready = bool(state["ready"])


@METHODS.register
class IPASD(Method):
    name = "ipasd"
    summary = "intra-class progressive and adaptive self-distillation: memories and prototypes (Gou et al. 2025)"
    Params = IPASDParams

    def __init__(self, params: IPASDParams, ctx: MethodContext):
        super().__init__(params, ctx)
        onehot = F.one_hot(ctx.train_labels, ctx.num_classes).float()
        memory = (ctx.num_train, ctx.num_classes, params.memory_dtype, ctx.device, onehot, ctx.collectives)
        # epoch 0: both memories hold one-hot labels, so epoch 0 trains with plain cross-entropy
        self.last_softmax = SampleMemory(*memory)
        self.last_proto = SampleMemory(*memory)
        self.prototypes = Prototypes(ctx.num_classes, ctx.embed_dim, ctx.device, ctx.collectives)

    def on_epoch_start(self, epoch: int) -> None:
        self.prototypes.reset()

    def loss(self, net, batch) -> StepResult:
        out = net(batch.images)
        idx, labels = batch.indices, batch.labels
        p = self.params
        result = ipasd_loss(
            out["logits"], out["embedding"], labels,
            self.last_proto.read(idx), self.last_softmax.read(idx),
            self.prototypes.current if self.prototypes.ready else None,
            progressive_alpha(batch.epoch, self.ctx.epochs, p.w_div), p.w_con, p.tau, p.con_grad,
        )
        self.last_softmax.write(idx, result.pop("new_l"))
        new_s = result.pop("new_s")
        if new_s is not None:
            self.last_proto.write(idx, new_s)
        self.prototypes.accumulate(out["embedding"], labels)
        return StepResult.of(result, out["logits"], labels)

    def on_epoch_end(self, epoch: int) -> None:
        self.prototypes.finish_epoch()

    def state_dict(self) -> dict:
        return {"last_softmax": self.last_softmax.state_dict(), "last_proto": self.last_proto.state_dict(),
                "prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_softmax.load_state_dict(state["last_softmax"])
        self.last_proto.load_state_dict(state["last_proto"])
        self.prototypes.load_state_dict(state["prototypes"])
