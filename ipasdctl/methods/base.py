"""The contract every method follows.

A method sees a batch (images, labels, dataset indices) and the training network, and returns a `StepResult`:
the loss to train on, the logits and the labels the step's accuracy is counted on (a method that trains on
part of the batch, as cs-kd's anchors or dlb's new half, says which), and its scalar loss terms (`loss_ce`,
`loss_kd`, ...), which the engine detaches and averages per epoch, so a training curve explains itself.
Per-sample memories and prototypes are method state: they go into the checkpoint. Auxiliary heads
(`extra_module`) are trained with the network and dropped for evaluation and export. Losses several methods
share are in methods/losses.py.

A method states its name once (`name`, read by `@METHODS.register`), declares its parameters' bounds on the
fields of its `Params` (`params.param(4.0, gt=0)`, checked when they are parsed, so a bad `--set` is refused
before anything trains; `check_params` adds the checks that involve several fields), declares the trained run it
needs (`reference_run_param`) and whether it changes the training images (`changes_images`) instead of being
known by name elsewhere, and reaches the other processes of a run only through `ctx.collectives` (the identity
on one process; training/distributed.py under several).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..config import build_dataclass
from ..errors import UserError
from ..params import NoParams, check_declared
from ..registry import Registry

METHODS: Registry = Registry("method")


@dataclass
class StepResult:
    """What a method's `loss` returns for one training step."""

    loss: torch.Tensor  # scalar with grad: what the step's backward runs on
    logits: torch.Tensor  # (n, K): the logits the step's training accuracy is counted on
    labels: torch.Tensor  # (n,): their labels (the batch's, or the part of it the logits belong to)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar loss terms; the engine detaches them

    @classmethod
    def of(cls, losses: dict, logits: torch.Tensor, labels: torch.Tensor) -> "StepResult":
        """From a loss function's `{"loss": ..., **terms}`."""
        terms = {key: value for key, value in losses.items() if key != "loss"}
        return cls(losses["loss"], logits, labels, terms)


class Collectives:
    """How a method's state reaches the other processes of a run. This one is a single process: every call is
    the identity. Under several processes the trainer hands `training.distributed.DistributedCollectives`."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def gather_rows(self, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (indices, rows), for an index write that may see a row twice (no host read)."""
        return indices, rows

    def all_gather_rows(self, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (indices, rows) exactly, in rank order (reads sizes from the device: checkpoints only)."""
        return indices, rows

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor in place over the ranks."""


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
    channels_last: bool = False  # the batches' memory layout (a model a method builds itself should match)
    image_shape: tuple = ()  # C, H, W of a training image (a teacher's MACs are counted at it)
    collectives: Collectives = field(default_factory=Collectives)


class Method:
    """Base class: plain cross-entropy behaviour for everything a method does not override."""

    name: str = "base"
    summary: str = ""  # what the method is, in one line (`ipasdctl list methods`)
    Params = NoParams
    # the parameter that names a trained run of the reference method (ce) to distil from; `compare` fills it
    # with the reference run of the same seed (trained first) when the user leaves it empty
    reference_run_param: Optional[str] = None
    # True for a method that trains on images it changes beyond the recipe's augmentation (mixed pairs, extra
    # distorted views): part of its effect is the data's, and the comparison tables mark it
    changes_images: bool = False

    def __init__(self, params, ctx: MethodContext):
        self.params = params
        self.ctx = ctx

    @classmethod
    def parse_params(cls, values: dict):
        """The method's Params from a recipe's `method:` mapping, every key, type and value checked."""
        values = {k: v for k, v in values.items() if k != "name"}
        params = build_dataclass(cls.Params, values, where="method")
        check_declared(params, "method")
        cls.check_params(params)
        return params

    @classmethod
    def check_params(cls, params) -> None:
        """Value checks that involve several parameters (a UserError each); one parameter's bounds are declared
        on its field, and checks that need the model or the data set stay in the constructor."""

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

    def loss(self, net: nn.Module, batch) -> StepResult:
        raise NotImplementedError

    def teacher_record(self) -> dict:
        """A method that distils from a separate teacher: {"teacher", "teacher_arch", "teacher_params",
        "teacher_macs"} for summary.json (the cost a teacher adds); {} for every other method."""
        return {}

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
