"""Checks of a run's data before anything trains (the recipe's are in resolve.py): each failure is one
UserError line."""

from __future__ import annotations

from ..errors import UserError
from ..runs import RunFolder


def check_labels(data, name: str) -> None:
    """Every label must name a class: a label outside 0..K-1 means corrupt files or mismatched class names.
    And the test split must not be empty: a run is judged (best.pt, summary.json) on it."""
    if data.num_test == 0:
        raise UserError(f"data set '{name}' has no test images (its test split is empty: the CIFAR test file, or the "
                        "class folders of val/); a run is judged on its test split: point --data at complete data")
    k = data.num_classes
    for split, labels in (("training", data.train_labels), ("test", data.test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise UserError(f"data set '{name}' has {split} labels from {int(labels.min())} to {int(labels.max())} but "
                            f"{k} classes; its files are corrupt or do not belong together: download it again")


def check_folder_still_there(folder: RunFolder) -> None:
    """Before the trainer writes into its run folder: the folder must still hold its config.yaml and its lock.
    One deleted (or moved) while the run trains is never recreated in part (checkpoints and metrics.csv
    without config.yaml or lock, which `eval` calls no run folder and `--resume` finished)."""
    if not (folder.config.is_file() and folder.lock().path.is_file()):
        raise UserError(f"run folder {folder.path} vanished while the run trained (its config.yaml or .lock is gone); "
                        "the run stopped without writing into it again: train again, or put the folder back and "
                        f"resume it (ipasdctl train --resume {folder.path})")
