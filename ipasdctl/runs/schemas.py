"""What the files of a run folder hold: the columns of a run's result row and the checkpoint's fields."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError

# the columns of a comparison's results.csv (and of a report's runs): what a finished run's summary holds
RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "best_top1", "last_top1", "best_epoch", "best_top5",
                  "params", "macs", "train_seconds", "images_per_second", "run_dir"]


MAX_CLASSES = 1_000_000


def check_state(state: dict, path: Path) -> dict:
    """The checkpoint's fields every command reads, with their types: a hand-made or damaged checkpoint is
    one line naming what is wrong, never a KeyError deep inside a command."""
    def problem() -> Optional[str]:
        if not isinstance(state.get("config"), dict):
            return "it holds no recipe ('config')"
        num_classes = state.get("num_classes")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
            return f"'num_classes' is {num_classes!r:.40}, not an integer from 1 to {MAX_CLASSES}"
        if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
            return "'model' is not a mapping of names to tensors"
        epoch = state.get("epoch", 0)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
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

