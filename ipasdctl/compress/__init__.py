"""Compression: from a run folder to a smaller run folder.

    prune.py      `ipasdctl prune`: the steps, the pruned run folder, its reuse and resume
    pruning.py    structured pruning of one network with torch-pruning (DepGraph): importance, the ratio that
                  reaches a MACs or latency target, what cannot be pruned safely
    recovery.py   the settings of a prune, and the recipe a pruned network recovers with (an ordinary run)
    latency.py    the batch-1 onnxruntime latency a latency target is measured with

It is a layer of its own below studies and above analysis and deploy: it orchestrates training runs and
times with deploy; nothing below imports it, and it imports no study (import-linter checks both; the API,
which studies' executors reach through the package, imports it). The pruned shapes are data of the recipe (models/structure.py),
so every other command reads a pruned run folder as any other.
"""

from .prune import prune_run
from .recovery import DEFAULT_EPOCHS, LR_SCALE, ROUND_TO, PruneSettings

__all__ = ["DEFAULT_EPOCHS", "LR_SCALE", "ROUND_TO", "PruneSettings", "prune_run"]
