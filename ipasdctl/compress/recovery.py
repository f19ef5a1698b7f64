"""What `ipasdctl prune` is asked for (PruneSettings, checked before anything is read or written) and the
recipe a pruned network recovers with: an ordinary training run (the same Trainer: it checkpoints and
resumes exactly after a kill) of the source run's own recipe, changed only where fine-tuning differs.

    model.structure   the pruned shapes (models/structure.py)
    model.weights     the pruned weights (<pruned>/pruned.safetensors, with the source's mean/std)
    model.pruning     the record: source run, checkpoint, target, importance, steps, this step
    model.freeze_epochs 0
    method            --method, else the source run's own (with its parameters); a method that distils
                      from a trained run (kd's `teacher`) gets the unpruned source as that run unless its
                      recipe names one, and always with --teacher-original
    optim.lr          the source's lr x --lr-scale (default LR_SCALE)
    optim             warm-up 0 epochs, cosine schedule, backbone_lr_scale 1 (the whole pruned network
                      recovers); momentum, nesterov and weight decay are the source's
    train.epochs      --epochs (default DEFAULT_EPOCHS), per step
    --set KEY=VALUE   over all of that, as `train --set`
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..config import Recipe, ResolvedRecipe, deep_merge, recipe_from_dict
from ..errors import UserError
from ..methods import method_class
from ..safe_io import check_checkpoint
from ..training import resolve_recipe
from .pruning import IMPORTANCES

DEFAULT_EPOCHS = 5
LR_SCALE = 0.1
ROUND_TO = 8  # channels per SIMD block of onnxruntime's AVX2 kernels (16 with AVX-512), and of GPU tensor cores
MAX_STEPS = 20
TEACHER_METHOD = "kd"  # --teacher-original without --method: knowledge distillation from the unpruned run


@dataclass
class PruneSettings:
    """The options of `ipasdctl prune` (one target: a share of the MACs, or a batch-1 latency)."""

    target_macs: Optional[float] = None  # keep this fraction of the source's MACs (0 < F < 1)
    target_latency_ms: Optional[float] = None  # reach this batch-1 p50 on this CPU (onnxruntime, fp32)
    importance: str = "magnitude"  # magnitude | taylor | bn-scale
    steps: int = 1  # prune a share, recover, repeat
    round_to: int = ROUND_TO  # keep every pruned layer's channels a multiple of this (the runtime's SIMD block)
    method: Optional[str] = None  # the recovery's method (None: the source run's own)
    epochs: int = DEFAULT_EPOCHS  # recovery epochs of each step
    lr_scale: float = LR_SCALE  # the recovery's lr: the source's x this
    teacher_original: bool = False  # distil from the unpruned source run
    checkpoint: str = "best"  # the source's checkpoint that is pruned (and each step's that the next prunes)
    overrides: dict = field(default_factory=dict)  # --set over the recovery recipe
    data: Optional[str] = None  # the data set's folder, when not where the source found it
    device: Optional[str] = None  # the recovery's training device (default: the source recipe's)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "PruneSettings":
        """Itself, or a UserError for the first option that is wrong (none needs the run: a chain checks
        them before its first link runs)."""
        macs, latency = self.target_macs, self.target_latency_ms
        if macs is None and latency is None:
            raise UserError("prune needs a target: --target-macs F (keep that fraction of the run's MACs, 0 < F < 1) "
                            "or --target-latency-ms MS (batch-1 latency on this CPU)")
        if macs is not None and latency is not None:
            raise UserError("give one target: --target-macs or --target-latency-ms, not both")
        if macs is not None and not 0 < macs < 1:
            raise UserError(f"--target-macs is the fraction of the run's MACs to keep, from 0 to 1 (exclusive), got "
                            f"{macs:g}; e.g. --target-macs 0.5")
        if latency is not None and not (0 < latency < 1e6 and math.isfinite(latency)):
            raise UserError(f"--target-latency-ms must be a positive number of milliseconds, got {latency:g}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"--importance must be one of {', '.join(IMPORTANCES)}, got '{self.importance}'")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or not 1 <= self.round_to <= 256:
            raise UserError(f"--round-to must be a whole number of channels from 1 (no rounding) to 256, got "
                            f"{self.round_to}; e.g. --round-to 8")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"--steps must be from 1 (one shot) to {MAX_STEPS}, got {self.steps}")
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (recovery epochs per step), got {self.epochs}")
        if not (0 < self.lr_scale <= 1e3 and math.isfinite(self.lr_scale)):
            raise UserError(f"--lr-scale must be a positive number (the source's lr x it), got {self.lr_scale:g}")
        check_checkpoint(self.checkpoint)
        if self.method is not None:
            method_class(self.method)  # unknown: one line with the known ones
        if self.teacher_original:
            method = self.method or TEACHER_METHOD
            if not method_class(method).reference_run_param:
                raise UserError(f"--teacher-original needs a method that distils from a trained run (kd); "
                                f"{method} takes no teacher: use --method kd")
        return self

    def pruning_record(self, source: Path, step: int) -> dict:
        """model.pruning of step `step` (config.PruningRecord's fields)."""
        return {"source": str(source), "checkpoint": self.checkpoint, "target_macs": self.target_macs,
                "target_latency_ms": self.target_latency_ms, "importance": self.importance, "steps": self.steps,
                "step": step, "round_to": self.round_to}


def teacher_spec(source: Path, checkpoint: str) -> str:
    """The source run as a weights spec (RUN for its best checkpoint, RUN:last)."""
    return str(source) if checkpoint == "best" else f"{source}:{checkpoint}"


def recovery_recipe(source_recipe: Recipe, source: Path, settings: PruneSettings, structure: Optional[dict],
                    weights: Path, step: int) -> ResolvedRecipe:
    """The recipe step `step` recovers with (see the module docstring), resolved: a UserError for anything
    it gets wrong (an unknown --set key, a method parameter out of range)."""
    values = source_recipe.to_dict()
    values["model"].update(weights=str(weights), structure=structure or None, freeze_epochs=0,
                           pruning=settings.pruning_record(source, step))
    optim = values["optim"]
    optim.update(lr=optim["lr"] * settings.lr_scale, warmup_epochs=0.0, schedule="cosine", backbone_lr_scale=1.0)
    values["train"]["epochs"] = settings.epochs
    own = values["method"].get("name")
    method = settings.method or (TEACHER_METHOD if settings.teacher_original and not
                                 method_class(own).reference_run_param else own)
    if method != own:
        values["method"] = {"name": method}
    teacher_key = method_class(method).reference_run_param
    if teacher_key and (settings.teacher_original or not values["method"].get(teacher_key)):
        values["method"][teacher_key] = teacher_spec(source, settings.checkpoint)
    if settings.data is not None:
        values["data"]["root"] = str(settings.data)
    if settings.device is not None:
        values["train"]["device"] = settings.device
    return resolve_recipe(recipe_from_dict(deep_merge(values, settings.overrides or {})))
