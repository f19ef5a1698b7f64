"""DLB: self-distillation from the last mini-batch.

Shen, Xu, Wang, Xu, Meng, Wang, Zhao, Zhang, Li, "Self-Distillation from the Last Mini-Batch for Consistency
Regularization", CVPR 2022 (Meta-knowledge-Lab/DLB). Batch t = [R, N_t]: R = N_{t-1}, the previous
iteration's new samples (now under a fresh augmentation), N_t = B new samples. With s the logits of R stored
(detached) at iteration t-1:
    loss = CE(z([R, N_t]), y) + a T^2 KL( softmax(s / T) || softmax(z(R) / T) ),   T 3, a 1
CE is the mean over all 2B rows of the batch (the authors' CE of the concatenation), KL the mean over R.

Machinery: `OverlapBatches` (data/samplers.py) gives [previous new half, new half], so consecutive batches
overlap by half; the logits of each step's new half are kept as method state (and in the checkpoint), so a
run resumed mid-epoch continues exactly. Readings chosen, from the authors' dlb.py:
- The batch size is the number of *new* samples per step (their `batch_size`); a step forwards up to 2B.
- The repeated half is re-augmented: its augmentation at step t is drawn independently of step t-1's.
- The last new half of an epoch is repeated by the first batch of the next epoch (their `pre_data` is
  carried across epochs); the very first step of training has no repeated half and is plain CE.
- Two forwards in training mode, as the authors: the new half, then the repeated half (BatchNorm sees
  each half's own statistics). `joint_forward=true` forwards the whole batch at once (one BatchNorm batch).
- The logits and labels returned (train accuracy) are the new half's, as the authors' accuracy.
Several processes (with `OverlapBatches.sharded`): each rank's repeated share is the new share it trained on
one step before, so its stored logits stay local and no step communicates for them. A checkpoint gathers the
ranks' stored logits in rank order (the context's `collectives.all_gather_rows`): that is the previous new chunk in
order, and a resumed rank keeps its share of it for the number of processes it runs with (`collectives.rank`, `world_size`), which is
the repeated share its plan gives it. Should the plans of two process counts differ at that step (a last
chunk smaller than the process count is left out of an epoch), the first step after a resume finds stored
logits of other samples and stops with an error instead of distilling from the wrong ones. Two forwards
before one backward need nothing special from DistributedDataParallel: each parameter's gradient is
accumulated once per backward, so its all-reduce hook fires once (a static graph would even be wrong: the
first step of training has one forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.samplers import OverlapBatches
from ..errors import UserError
from ..params import param
from .base import METHODS, Collectives, Method, MethodContext, StepResult
from .losses import distill_kl


@dataclass
class DLBParams:
    T: float = param(3.0, gt=0, tune=(1.0, 8.0))
    kd_weight: float = param(1.0, ge=0, tune=(0.1, 4.0), log=True)  # a
    joint_forward: bool = False  # true: one forward of [repeated, new] (shared BatchNorm statistics)


def dlb_loss(new_logits: torch.Tensor, new_labels: torch.Tensor, repeated_logits: Optional[torch.Tensor],
             repeated_labels: Optional[torch.Tensor], stored_logits: Optional[torch.Tensor],
             temperature: float, kd_weight: float) -> dict:
    """CE over [repeated, new] + kd_weight * T^2 KL(p_T(stored) || p_T(repeated now)); no repeated half: CE."""
    new_logits = new_logits.float()
    if repeated_logits is None or repeated_logits.shape[0] == 0:
        loss_ce = F.cross_entropy(new_logits, new_labels)
        loss_kd = torch.zeros((), device=new_logits.device)
    else:
        repeated_logits = repeated_logits.float()
        loss_ce = F.cross_entropy(torch.cat([repeated_logits, new_logits]), torch.cat([repeated_labels, new_labels]))
        loss_kd = distill_kl(repeated_logits, stored_logits, temperature)
    return {"loss": loss_ce + kd_weight * loss_kd, "loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}


class LastStepLogits:
    """The logits (and dataset indices) of the last step's new half: the next step's repeated half.

    Under several processes each rank holds those of its own share; the collectives' `all_gather_rows`
    make the checkpoint hold every rank's, and a resumed rank take its share back (its `rank`, `world_size`).
    """

    def __init__(self, num_classes: int, device, collectives: Optional[Collectives] = None):
        self.logits = torch.zeros(0, num_classes, device=device)
        self.indices = torch.zeros(0, dtype=torch.long, device=device)
        self.collectives = collectives or Collectives()
        self.check_against_plan = False  # after a resume: compare the first repeated half with the plan's

    def store(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        self.indices = indices
        self.logits = logits.detach().float()

    def state_dict(self) -> dict:
        indices, logits = self.indices, self.logits
        if self.collectives.enabled:
            indices, logits = self.collectives.all_gather_rows(indices, logits)
        return {"stored_logits": logits, "stored_indices": indices}

    def load_state_dict(self, state: dict, device) -> None:
        rank, world = self.collectives.rank, self.collectives.world_size
        self.logits = state["stored_logits"].to(device, torch.float32).tensor_split(world)[rank]
        self.indices = state["stored_indices"].to(device, torch.long).tensor_split(world)[rank]
        self.check_against_plan = True

    def verify(self, repeated_indices: torch.Tensor) -> None:
        """Once, after a resume: the restored logits must be those of the samples the plan repeats now."""
        self.check_against_plan = False
        if not torch.equal(self.indices, repeated_indices):
            raise UserError("dlb: the checkpoint's stored logits belong to other samples than this step repeats; "
                            "resume this run with the number of processes it was checkpointed with")


@METHODS.register
class LastMiniBatch(Method):
    name = "dlb"
    summary = "self-distillation from the last mini-batch's stored logits (Shen et al. 2022)"
    Params = DLBParams

    def __init__(self, params: DLBParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.last_step = LastStepLogits(ctx.num_classes, ctx.device, ctx.collectives)

    @property
    def stored_logits(self) -> torch.Tensor:
        return self.last_step.logits

    @property
    def stored_indices(self) -> torch.Tensor:
        return self.last_step.indices

    def batch_plan(self, labels: torch.Tensor, batch_size: int, seed: int):
        return OverlapBatches(labels, batch_size, seed)

    def loss(self, net, batch) -> StepResult:
        repeated = self.stored_logits.shape[0]  # the plan puts exactly that many repeated samples first
        if repeated >= batch.labels.shape[0]:
            raise RuntimeError(f"dlb: batch of {batch.labels.shape[0]} cannot hold {repeated} repeated samples "
                               "and new ones; the batch plan and the method state disagree")
        if self.last_step.check_against_plan:
            self.last_step.verify(batch.indices[:repeated])
        new_labels, repeated_labels = batch.labels[repeated:], batch.labels[:repeated]
        repeated_logits = None
        if repeated == 0:
            new_logits = net(batch.images)["logits"]
        elif self.params.joint_forward:
            logits = net(batch.images)["logits"]
            repeated_logits, new_logits = logits[:repeated], logits[repeated:]
        else:
            new_logits = net(batch.images[repeated:])["logits"]
            repeated_logits = net(batch.images[:repeated])["logits"]
        result = dlb_loss(new_logits, new_labels, repeated_logits, repeated_labels, self.stored_logits,
                          self.params.T, self.params.kd_weight)
        self.last_step.store(batch.indices[repeated:], new_logits)
        return StepResult.of(result, new_logits, new_labels)

    def state_dict(self) -> dict:
        return self.last_step.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"stored_logits", "stored_indices"}:
            raise UserError("checkpoint holds state for a method other than 'dlb'")
        self.last_step.load_state_dict(state, self.ctx.device)
