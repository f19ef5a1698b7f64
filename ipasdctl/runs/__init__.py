"""Run folders and comparison folders: their layout, what their files hold, their lock. The one place that
spells their file names; every other module reaches them through the names below.

    folder.py      RunFolder: one run's files, how they are read and written; load_model; creating run folders
    comparison.py  ComparisonFolder: a comparison's files and its run folders
    schemas.py     what a run's files hold: the result row's columns, the checkpoint's fields (check_state)
    lock.py        RunLock: one process writes a folder at a time
"""

from .comparison import ComparisonFolder, comparison_run_name
from .folder import (RunFolder, check_out_folder, check_run_name, create_run_dir, default_run_name, load_model,
                     read_json, write_metrics_csv)
from .lock import RunLock
from .schemas import MAX_CLASSES, RESULT_COLUMNS, check_state

__all__ = ["MAX_CLASSES", "RESULT_COLUMNS", "ComparisonFolder", "RunFolder", "RunLock", "check_out_folder", "check_run_name",
           "check_state", "comparison_run_name", "create_run_dir", "default_run_name", "load_model", "read_json",
           "write_metrics_csv"]
