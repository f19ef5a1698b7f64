"""summary.json of a finished run, from the trainer's state: the runs.RunSummary schema filled in."""

from __future__ import annotations

import torch

from .. import runtime
from ..runs import RunSummary


def run_summary(trainer, wall_seconds: float) -> RunSummary:
    """What the run reached (best and last epoch), what it trained on and with, and what it cost;
    wall_seconds adds up every session of the run (it is kept in the checkpoint)."""
    last = trainer.rows[-1]
    summary = RunSummary(
        name=trainer.folder.name,
        method=trainer.recipe.method["name"],
        changes_images=trainer.method.changes_images,
        arch=trainer.recipe.model.arch,
        dataset=trainer.recipe.data.name,
        num_classes=trainer.data.num_classes,
        train_images=trainer.data.num_train,
        epochs=trainer.recipe.train.epochs,
        seed=trainer.recipe.train.seed,
        best_top1=trainer.best_top1,
        best_top5=trainer.best_top5,
        best_epoch=trainer.best_epoch,
        best_chosen_on=trainer.chosen_on,
        best_val_top1=trainer.best_score if trainer.data.num_val else None,
        val_images=trainer.data.num_val,
        label_noise_applied=(trainer.data.origin.get("label_noise") or {}).get("applied_rate", 0.0),
        last_top1=last["test_top1"],
        last_top5=last["test_top5"],
        params=trainer.params,
        macs=trainer.macs,
        train_seconds=trainer.train_seconds,
        wall_seconds=wall_seconds,
        images_per_second=sum(r["images_per_second"] for r in trainer.rows) / len(trainer.rows),
        device=runtime.device_description(trainer.device),
        precision=str(trainer.dtype).replace("torch.", ""),
        torch=torch.__version__,
        git_commit=runtime.git_commit(),
        test_images=trainer.data.num_test,
        test_subset=trainer.recipe.data.test_subset,
        eval_every=trainer.recipe.train.eval_every,
        threads=torch.get_num_threads(),
        finished=True,
        processes=trainer.dist.world_size,
        weights=trainer.weights.to_dict() if trainer.weights is not None else None,
        **trainer.method.teacher_record(),
    )
    return summary
