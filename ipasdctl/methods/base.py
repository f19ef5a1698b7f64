"""The contract every method follows.

A method sees a batch (images, labels, dataset indices) and the training network, and returns
`{"loss": scalar with grad, "logits": the logits the batch's labels belong to, **terms}`; every other entry
is a detached scalar loss term (`loss_ce`, `loss_kd`, ...) that the engine averages per epoch, so a training
curve explains itself. Per-sample memories and prototypes are method state: they go into the checkpoint.
Auxiliary heads (`extra_module`) are trained with the network and dropped for evaluation and export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..config import build_dataclass
from ..errors import UserError


@dataclass
class NoParams:
    pass


@dataclass
class MethodContext:
    num_classes: int
    num_train: int
    train_labels: torch.Tensor  # on the training device
    embed_dim: int
    stage_channels: list[int]
    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    run_dir: Optional[str] = None
    channels_last: bool = False  # the batches' memory layout (a model a method builds itself should match)


class Method:
    """Base class: plain cross-entropy behaviour for everything a method does not override."""

    name: str = "base"
    Params = NoParams

    def __init__(self, params, ctx: MethodContext):
        self.params = params
        self.ctx = ctx

    @classmethod
    def parse_params(cls, values: dict):
        values = {k: v for k, v in values.items() if k != "name"}
        return build_dataclass(cls.Params, values, where="method")

    # ------------------------------------------------------------------ hooks with defaults
    def extra_module(self) -> Optional[nn.Module]:
        """Training-only modules (auxiliary heads): called inside the network's forward with its outputs."""
        return None

    def batch_plan(self, labels: torch.Tensor, batch_size: int, seed: int) -> Optional[Callable[[int], list]]:
        """A sampler of the method's own (epoch -> list of index tensors), or None for the default order."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def loss(self, net: nn.Module, batch) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise UserError(f"checkpoint holds state for a method other than '{self.name}'")


class TrainingNet(nn.Module):
    """The backbone plus the method's training-only heads, as one module (one forward for DDP).

    forward(x) -> {"logits", "embedding", "stages", **head outputs}.
    """

    def __init__(self, model: nn.Module, extra: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, x: torch.Tensor) -> dict:
        logits, embedding, stages = self.model(x, with_features=True)
        out = {"logits": logits, "embedding": embedding, "stages": stages}
        if self.extra is not None:
            out.update(self.extra(out))
        return out
