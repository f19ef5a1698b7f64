"""The training loop and what it needs: one run, one process or several (torchrun/DDP).

Imports nothing of studies, analysis or deploy (import-linter checks it)."""

from .progress import Progress, run_line
from .resolve import resolve_recipe, resolved, resolved_dict
from .sessions import resume, resume_recipe, train, train_into
from .stopping import Interrupted
from .trainer import Trainer

__all__ = ["Interrupted", "Progress", "Trainer", "resolve_recipe", "resolved", "resolved_dict", "resume",
           "resume_recipe", "run_line", "train", "train_into"]
