"""Experiment tracking (recipe key train.track, `--track`): TensorBoard or MLflow, off by default.

A tracked run logs its resolved recipe as parameters (dotted keys: optim.lr, method.w_div, ...), every column
of metrics.csv at each epoch end (step = epoch; an epoch without a test pass, train.eval_every, has no test
figures), and the numeric figures of summary.json (`summary/<key>`) when it finishes. TensorBoard groups the
columns by split (`board_tag`: train/loss_ce, val/top1, test/top1, ...); MLflow keeps the column names. Rank 0 alone logs. Each backend is an optional extra, checked before anything trains:
- tensorboard (the extra `ipasdctl[tensorboard]`): event files in the run folder's tensorboard/
  (`tensorboard --logdir runs` shows every run); the recipe in the HParams tab and as text.
- mlflow (the extra `ipasdctl[mlflow]`): the store MLFLOW_TRACKING_URI names, else sqlite:///<the folder that
  holds the run folder>/mlflow.db; experiment MLFLOW_EXPERIMENT_NAME, else the recipe's name; one MLflow run
  per run folder (tag ipasdctl.run_dir), which a resume continues.
A resumed run logs the epochs its checkpoint holds that the tracker has not seen yet, so a run killed between
its checkpoint and its log loses no epoch.
"""

from __future__ import annotations

import contextlib

import importlib.util
import math
import os
from pathlib import Path
from typing import Optional

from ..config import Recipe, dump_recipe
from ..errors import UserError
from ..runs import RunFolder
from ..version import install_command

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # backend -> the module its extra installs
RUN_DIR_TAG = "ipasdctl.run_dir"


def check_track(track: Optional[str]) -> None:
    """train.track is null or a known backend whose package is installed: else one line saying how to fix it."""
    if track is None:
        return
    if track not in TRACKERS:
        raise UserError(f"train.track must be one of {', '.join(TRACKERS)} (or null for none), got '{track}'")
    if importlib.util.find_spec(TRACKERS[track]) is None:
        raise UserError(f"--track {track} needs the {track} package: {install_command(track)}")


def recipe_params(recipe: Recipe) -> dict:
    """The resolved recipe as flat dotted keys; values a tracker can hold (numbers, booleans, strings)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists
            flat[prefix] = str(value)

    walk("", recipe.to_dict())
    return flat


def numeric(values: dict) -> dict:
    """The finite numbers among `values` (what a metric can be), as floats."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def board_tag(column: str) -> str:
    """A metrics.csv column as a TensorBoard tag grouped by split: test_top1 -> test/top1, val_loss -> val/loss,
    train_loss -> train/loss, loss_ce -> train/loss_ce; what is not a held-out figure (lr, epoch_seconds, a
    method's own statistics) belongs to training: train/lr."""
    for split in ("test", "val"):
        if column.startswith(split + "_"):
            return f"{split}/{column[len(split) + 1:]}"
    return "train/" + column.removeprefix("train_")


class NoTracker:
    """train.track null, or a rank other than 0: every call does nothing."""

    def log_epoch(self, row: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardTracker(NoTracker):
    def __init__(self, folder: RunFolder, recipe: Recipe, rows: list[dict]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step 1: what an earlier session logged past its checkpoint is dropped, and `rows` logged again
        self.writer = SummaryWriter(log_dir=str(folder.tensorboard), purge_step=1 if rows else None)
        params = recipe_params(recipe)
        for summary in hparams(params, {"summary/best_top1": 0.0, board_tag("test_top1"): 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("recipe", "```\n" + dump_recipe(recipe) + "```")
        for row in rows:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        for key, value in numeric(row).items():
            if key != "epoch":
                self.writer.add_scalar(board_tag(key), value, int(row["epoch"]))
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        for key, value in numeric(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, int(summary["epochs"]))
        self.writer.add_text("summary", "\n".join(f"{k}: {v}" for k, v in summary.items()), int(summary["epochs"]))

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker(NoTracker):
    def __init__(self, folder: RunFolder, recipe: Recipe, rows: list[dict]):
        import logging

        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        for name in ("mlflow", "alembic"):  # their INFO lines (creating a store's tables) are no progress of ours
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder.mlflow_store.resolve()}"
        run_dir = str(folder.path.resolve())
        # the runs of a `compare --jobs N` share one store: one process at a time creates its tables, the
        # experiment and its run (they race otherwise: "duplicate column", "experiment already exists")
        with _store_lock(folder.mlflow_store.with_name(folder.mlflow_store.name + ".lock")):
            self.client = client = MlflowClient(uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe.name
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
            found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                                       max_results=1)
            if not found:
                self.run_id = client.create_run(experiment_id, run_name=folder.name,
                                                tags={RUN_DIR_TAG: run_dir}).info.run_id
        if found:  # a resume: the same MLflow run goes on
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            logged = client.get_metric_history(self.run_id, "test_top1")
            seen = max((m.step for m in logged), default=0)
        else:
            params = [Param(k, str(v)[:6000]) for k, v in recipe_params(recipe).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                client.log_batch(self.run_id, params=params[start:start + 100])
            client.log_batch(self.run_id, tags=[RunTag("recipe", dump_recipe(recipe)[:5000])])
            seen = 0
        for row in rows:
            if int(row["epoch"]) > seen:
                self.log_epoch(row)

    def _log(self, values: dict, step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in values.items()])

    def log_epoch(self, row: dict) -> None:
        self._log({k: v for k, v in numeric(row).items() if k != "epoch"}, int(row["epoch"]))

    def finish(self, summary: dict) -> None:
        self._log({f"summary/{k}": v for k, v in numeric(summary).items()}, int(summary["epochs"]))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_tracker(recipe: Recipe, folder: RunFolder, rows: list[dict], is_main: bool = True) -> NoTracker:
    """The recipe's tracker for `folder` (rank 0 only), having logged the parameters and `rows` it lacks."""
    track = recipe.train.track
    if track is None or not is_main:
        return NoTracker()
    check_track(track)
    return (TensorBoardTracker if track == "tensorboard" else MlflowTracker)(folder, recipe, rows)


@contextlib.contextmanager
def _store_lock(path: Path):
    """An exclusive flock on `path` for the block (released when the block ends or the process dies)."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
