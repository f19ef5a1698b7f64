"""Run folders and comparison folders: their layout, what their files hold, their lock. The one place that
spells their file names; every other module reaches them through the names below.

    folder.py      RunFolder: one run's files, how they are read and written; load_model; creating run folders
    comparison.py  ComparisonFolder: a comparison's files and its run folders
    schemas.py     what a run's files hold: RunSummary (summary.json), Checkpoint (checked by check_state), the
                   columns of a run's row in the tables
    study.py       StudyFolder: a tuning study's files and its trial run folders
    lock.py        RunLock: one process writes a folder at a time
    weights.py     where initial weights or a teacher come from (a file, a run folder, torchvision's or timm's zoo)
"""

from .comparison import ComparisonFolder, comparison_run_name
from .folder import (RunFolder, check_out_folder, check_run_name, create_run_dir, default_run_name, load_model,
                     read_json, write_metrics_csv)
from .lock import RunLock
from .study import StudyFolder, trial_run_name
from .schemas import (CHECKPOINT_FORMAT, RESULT_COLUMNS, BestEpoch, Checkpoint, DataStats, RunSummary, check_state,
                      pruned_suffix, pruning_label)

__all__ = ["CHECKPOINT_FORMAT", "RESULT_COLUMNS", "BestEpoch", "Checkpoint", "ComparisonFolder", "DataStats",
           "RunFolder", "RunLock", "RunSummary", "StudyFolder", "check_out_folder", "check_run_name", "check_state",
           "comparison_run_name", "create_run_dir", "default_run_name", "load_model", "pruned_suffix", "pruning_label",
           "read_json", "trial_run_name", "write_metrics_csv"]
