"""The training loop and what it needs: one run, one process or several (torchrun/DDP).

Imports nothing of studies, analysis or deploy (import-linter checks it)."""

from .checks import check_recipe
from .progress import Progress, run_line
from .sessions import resume, resume_recipe, train, train_into
from .stopping import Interrupted
from .trainer import Trainer

__all__ = ["Interrupted", "Progress", "Trainer", "check_recipe", "resume", "resume_recipe", "run_line", "train",
           "train_into"]
