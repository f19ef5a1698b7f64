"""What the files of a run folder hold: summary.json (`RunSummary`), the checkpoints (`Checkpoint`, checked by
`check_state`) and a run's row in the tables (`RESULT_COLUMNS`).

The trainer writes both through these definitions; every reader reads them through these names, so a new field
is one line here (and the line of the trainer that fills it in).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TypedDict

import torch

from ..bounds import MAX_CLASSES, whole
from ..errors import UserError

# the columns of a comparison's results.csv (and of a report's runs): what a finished run's summary holds
RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "changes_images", "best_top1", "last_top1", "best_epoch",
                  "best_top5", "params", "macs", "train_seconds", "images_per_second", "run_dir"]


@dataclass
class RunSummary:
    """summary.json: written once, when the run has finished. Read from a file, a field another version did not
    write is None (and `finished` is True only when the file says exactly that)."""

    name: Optional[str] = None  # the run folder's name
    method: Optional[str] = None
    changes_images: Optional[bool] = None  # the method trains on images it changes (mixup pairs, extra views)
    arch: Optional[str] = None
    dataset: Optional[str] = None
    num_classes: Optional[int] = None
    train_images: Optional[int] = None
    epochs: Optional[int] = None
    seed: Optional[int] = None
    best_top1: Optional[float] = None  # test top-1 (%) of the best epoch
    best_top5: Optional[float] = None
    best_epoch: Optional[int] = None
    best_chosen_on: Optional[str] = None  # the split whose top-1 chose the best epoch (and best.pt): val or test
    best_val_top1: Optional[float] = None  # None without a validation split
    val_images: Optional[int] = None
    label_noise_applied: Optional[float] = None
    last_top1: Optional[float] = None
    last_top5: Optional[float] = None
    params: Optional[int] = None
    macs: Optional[int] = None
    train_seconds: Optional[float] = None
    wall_seconds: Optional[float] = None  # every session of the run added up
    images_per_second: Optional[float] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    torch: Optional[str] = None
    git_commit: Optional[str] = None
    test_images: Optional[int] = None  # what the test figures are measured on: data.test_subset or the whole set
    test_subset: Optional[int] = None
    eval_every: Optional[int] = None
    threads: Optional[int] = None  # CPU numbers are bitwise reproducible for the same count
    finished: bool = False
    processes: Optional[int] = None  # of the last session
    weights: Optional[dict] = None  # model.weights: source, sha256, tensors loaded / re-initialised, mean/std
    teacher: Optional[str] = None  # a method's teacher (kd): the run folder or weights spec it distils from
    teacher_arch: Optional[str] = None
    teacher_params: Optional[int] = None
    teacher_macs: Optional[int] = None  # per image, on top of the student's in every training step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> "RunSummary":
        """The fields of a summary.json object (keys it does not know are left out)."""
        known = {field.name for field in dataclasses.fields(cls)} - {"finished"}
        return cls(**{key: value[key] for key in known if key in value}, finished=value.get("finished") is True)

    def result_row(self) -> dict:
        """The RESULT_COLUMNS this summary holds (run_dir: None, the reader knows where the run is)."""
        return {column: getattr(self, column, None) for column in RESULT_COLUMNS}


CHECKPOINT_FORMAT = "ipasdctl-checkpoint-1"


class BestEpoch(TypedDict):
    top1: float  # test top-1 (%) of the best epoch so far; -1 before the first epoch
    epoch: int
    top5: float
    score: float  # the top-1 that chose it: on the validation split when there is one, else the test top-1
    chosen_on: str  # val or test


class DataStats(TypedDict):
    """What `predict` needs to preprocess an image file as the test set was."""

    mean: list[float]
    std: list[float]
    image_shape: list[int]  # C, H, W


class Checkpoint(TypedDict):
    """checkpoints/last.pt and best.pt (a dict, saved weights-only), in the order Trainer.state_dict writes
    them. Every command reads config, num_classes, model, epoch, arch and class_names (checked by check_state);
    the rest is the training state an exact resume needs."""

    format: str  # CHECKPOINT_FORMAT
    config: dict  # the resolved recipe (Recipe.to_dict)
    model: dict[str, torch.Tensor]  # the evaluation network's weights
    extra: dict[str, torch.Tensor]  # the method's training-only modules (auxiliary heads); {} when none
    optimizer: dict
    scaler: dict
    method: dict  # the method's own state (memories, stored logits)
    epoch: int  # finished epochs
    step_in_epoch: int  # steps done in the epoch under way (a mid-epoch checkpoint)
    global_step: int
    meter: dict  # the running sums of the epoch under way
    rows: list[dict]  # metrics.csv's rows so far
    best: BestEpoch
    train_seconds: float
    epoch_seconds: float
    wall_seconds: float
    rng: dict  # every random generator's state (runtime.rng_state)
    num_classes: int
    class_names: list[str]
    data_stats: DataStats
    arch: str
    world_size: int  # for the record: any number of processes can resume it


def check_state(state: dict, path: Path) -> dict:
    """The checkpoint's fields every command reads (see Checkpoint), with their types: a hand-made or damaged
    checkpoint is one line naming what is wrong, never a KeyError deep inside a command."""
    def problem() -> Optional[str]:
        if not isinstance(state.get("config"), dict):
            return "it holds no recipe ('config')"
        num_classes = state.get("num_classes")
        if not whole(num_classes, 1, MAX_CLASSES):
            return f"'num_classes' is {num_classes!r:.40}, not an integer from 1 to {MAX_CLASSES}"
        if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
            return "'model' is not a mapping of names to tensors"
        epoch = state.get("epoch", 0)
        if not whole(epoch, 0, math.inf):
            return f"'epoch' is {epoch!r:.40}, not a whole number of epochs"
        if not isinstance(state.get("arch", ""), str):
            return "'arch' is not a name"
        names = state.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != num_classes):
            return f"'class_names' is not a list of {num_classes} names"
        return None

    what = problem()
    if what:
        raise UserError(f"{path} is not a checkpoint ipasdctl can use: {what}; use a checkpoint written by "
                        "`ipasdctl train`")
    return state



def _pruning_fields(record) -> Optional[dict]:
    """model.pruning as a dict (a recipe holds a config.PruningRecord, config.yaml a mapping); None when unpruned."""
    if dataclasses.is_dataclass(record):
        record = dataclasses.asdict(record)
    return record if isinstance(record, dict) and record else None


def pruning_label(record) -> str:
    """What the selection table and the reports call a run's pruning: 'none', 'macs 50% magnitude',
    'latency 2.5ms taylor', with '3 steps' added when it was pruned in several and 'round 8' when its channel
    counts were kept multiples of 8."""
    fields = _pruning_fields(record)
    if fields is None:
        return "none"
    macs, latency = fields.get("target_macs"), fields.get("target_latency_ms")
    target = f"macs {100 * macs:g}%" if isinstance(macs, (int, float)) else \
        f"latency {latency:g}ms" if isinstance(latency, (int, float)) else "pruned"
    steps = fields.get("steps")
    several = f" {steps} steps" if isinstance(steps, int) and steps > 1 else ""
    round_to = fields.get("round_to")
    rounded = f" round {round_to}" if isinstance(round_to, int) and round_to > 1 else ""
    return f"{target} {fields.get('importance') or 'magnitude'}{several}{rounded}"


def pruned_suffix(record) -> str:
    """'-pruned-50' (to 50 % of the MACs) or '-pruned-2.5ms' for a pruned run's names; '' when unpruned."""
    fields = _pruning_fields(record)
    if fields is None:
        return ""
    macs, latency = fields.get("target_macs"), fields.get("target_latency_ms")
    if isinstance(macs, (int, float)):
        return f"-pruned-{100 * macs:g}"
    return f"-pruned-{latency:g}ms" if isinstance(latency, (int, float)) else "-pruned"
