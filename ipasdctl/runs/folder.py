"""The run folder: the interface between every command, and the one module that knows its layout.

    <run>/config.yaml            the fully resolved recipe (a run can be repeated from its folder alone)
    <run>/metrics.csv            one row per finished epoch
    <run>/summary.json           written when the run finishes ("finished": true)
    <run>/checkpoints/last.pt    every epoch end (and every checkpoint.every_steps steps)
    <run>/checkpoints/best.pt    the epoch with the best top-1 so far (validation split if any, else test)
    <run>/splits.json            how the training split was derived: validation indices, label noise applied
    <run>/temperature.json       `ipasdctl calibrate`: the fitted temperature per checkpoint (export folds it in)
    <run>/.lock                  held (flock) by the one process that trains into the folder
    <run>/pruning.json           `ipasdctl prune`: the settings a rerun compares, and what each step reached
    <run>/pruned.safetensors     `ipasdctl prune`: the pruned weights the recovery started from (model.weights)
    <run>/steps/<k>/             `ipasdctl prune --steps K`: the run folders of steps 1 .. K-1 (step K is <run>)
    <run>/.prune-lock            held by the one `ipasdctl prune` that works in the folder
    <run>/tensorboard/           event files of `--track tensorboard`
    <run>/../mlflow.db           `--track mlflow`'s default store, shared by the run folders beside it
    <run>/eval.json, ...         written by `ipasdctl eval` (analysis/evaluation.py names its files)

A comparison folder (comparison.py) holds one run folder per method and seed. Training writes a run folder
through `RunFolder`; every other command reads it through `RunFolder` too, and builds the evaluated network with
`load_model` (weights-only, from `models`). What its files hold: schemas.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..config import Recipe, dump_recipe, recipe_from_dict
from ..errors import UserError, one_line
from ..models import build_model
from ..runtime import resolve_device
from ..safe_io import (atomic_write_json, atomic_write_text, check_checkpoint, load_checkpoint, neutral_cell,
                       remove_temporaries, rows_csv_text, save_checkpoint)
from ..yaml_files import read_yaml_file
from .lock import RunLock
from .schemas import RESULT_COLUMNS, RunSummary, check_state, pruned_suffix, pruning_label


def default_run_name(recipe: Recipe) -> str:
    arch = recipe.model.arch.replace(":", "-")  # timm:<name>: a ':' would read as RUN:last in a weights spec
    pruned = pruned_suffix(recipe.model.pruning)  # beside its source, a pruned run's export needs a name of its own
    return f"{recipe.data.name}-{arch}{pruned}-{recipe.method['name']}-s{recipe.train.seed}"


class RunFolder:
    """One run folder: where each of its files is, and how it is read and written."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -------------------------------------------------------------------------------- layout
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def mlflow_store(self) -> Path:
        return self.path.parent / "mlflow.db"

    @property
    def splits(self) -> Path:
        return self.path / "splits.json"

    @property
    def temperature(self) -> Path:
        return self.path / "temperature.json"

    @property
    def pruning(self) -> Path:
        return self.path / "pruning.json"

    @property
    def pruned_weights(self) -> Path:
        return self.path / "pruned.safetensors"

    def prune_step(self, step: int) -> "RunFolder":
        """The run folder of an earlier step of `ipasdctl prune --steps K`."""
        return RunFolder(self.path / "steps" / str(step))

    def prune_lock(self) -> "RunLock":
        return RunLock(self.path, ".prune-lock")

    def pruning_label(self) -> str:
        """How the run was pruned ('macs 50% magnitude'), or 'none', read from config.yaml."""
        try:
            config = self.read_config() or {}
        except UserError:
            config = {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        return pruning_label(model.get("pruning"))

    def checkpoint(self, which: str = "last") -> Path:
        return self.checkpoints / f"{which}.pt"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    def lock(self) -> "RunLock":
        return RunLock(self.path)

    # -------------------------------------------------------------------------------- reading
    def is_run(self) -> bool:
        return self.path.is_dir() and self.config.is_file() and self.checkpoints.is_dir()

    def check(self) -> "RunFolder":
        """Itself, or a UserError saying why the path is no run folder."""
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist; pass a run folder written by `ipasdctl train` or a .onnx file")
        if not self.path.is_dir():
            raise UserError(f"{self.path} is neither a run folder nor a .onnx model; pass a folder written by "
                            "`ipasdctl train` or an exported .onnx file")
        if not self.is_run():
            raise UserError(f"{self.path} is not a run folder (no config.yaml and checkpoints/ in it); pass a folder "
                            "written by `ipasdctl train`")
        return self

    def read_summary(self) -> Optional[RunSummary]:
        """summary.json; None when missing or unreadable."""
        value = read_json(self.summary)
        return RunSummary.from_dict(value) if value is not None else None

    def state(self) -> str:
        """'finished' (summary.json says so), 'resumable' (checkpoints/last.pt exists) or 'new'."""
        summary = self.read_summary()
        if summary is not None and summary.finished:
            return "finished"
        if self.last.is_file():
            return "resumable"
        return "new"

    def epochs_done(self) -> int:
        if not self.metrics.is_file():
            return 0
        try:
            return max(len(self.metrics.read_text(errors="replace").strip().splitlines()) - 1, 0)
        except OSError:
            return 0

    def read_config(self) -> Optional[dict]:
        """config.yaml as a plain dict; None when missing; a UserError when it is not YAML."""
        if not self.config.is_file():
            return None
        return read_yaml_file(self.config, str(self.config), f"is {self.path} a run folder? remove it, or train it "
                              "again") or {}

    def load_state(self, which: str = "best") -> dict:
        """A checkpoint's state, loaded weights-only."""
        path = self.checkpoint(check_checkpoint(which))
        if not path.is_file():
            raise UserError(f"{self.path} has no checkpoints/{which}.pt; is it a run folder of a finished "
                            "`ipasdctl train`?")
        return check_state(load_checkpoint(path), path)

    def result_row(self) -> dict:
        """The RESULT_COLUMNS of this run, from summary.json (or config.yaml + metrics.csv if unfinished)."""
        summary = self.read_summary()
        if summary is not None and summary.finished:
            row = summary.result_row()
        else:
            config = self.read_config() or {}
            row = {"method": (config.get("method") or {}).get("name"),
                   "seed": (config.get("train") or {}).get("seed"),
                   "arch": (config.get("model") or {}).get("arch"),
                   "dataset": (config.get("data") or {}).get("name"),
                   "epochs": (config.get("train") or {}).get("epochs")}
            if self.metrics.is_file():
                import pandas as pd

                frame = pd.read_csv(self.metrics)
                if len(frame):
                    chosen_on = "val_top1" if "val_top1" in frame else "test_top1"
                    best = frame[chosen_on].idxmax()
                    row.update(best_top1=frame["test_top1"][best], last_top1=frame["test_top1"].iloc[-1],
                               best_epoch=int(frame["epoch"][best]), best_top5=frame["test_top5"][best])
            row = {column: row.get(column) for column in RESULT_COLUMNS}
        row["run_dir"] = str(self.path)
        return row

    # -------------------------------------------------------------------------------- writing
    def write_config(self, recipe: Recipe, loaded: Optional[dict] = None) -> None:
        """config.yaml; `loaded`: what model.weights loaded (source, sha256, tensor counts), kept as comments
        above the recipe (a record, not a key: the recipe stays the one that repeats the run)."""
        notes = "".join(f"# model.weights {key}: {value}\n" for key, value in (loaded or {}).items()
                        if key in ("source", "sha256", "tensors_loaded", "tensors_reinitialised"))
        atomic_write_text(self.config, notes + dump_recipe(recipe))

    def write_metrics(self, rows: list[dict]) -> None:
        write_metrics_csv(self.metrics, rows)

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.summary, summary.to_dict())

    def write_splits(self, origin: dict) -> None:
        atomic_write_json(self.splits, origin)

    def read_temperature(self, checkpoint: str = "best") -> Optional[dict]:
        """The temperature fitted for `checkpoint` ({"temperature", "epoch", ...}), or None when there is none."""
        entry = (read_json(self.temperature) or {}).get(checkpoint)
        return entry if isinstance(entry, dict) and isinstance(entry.get("temperature"), (int, float)) else None

    def write_temperature(self, checkpoint: str, entry: dict) -> None:
        """Record the temperature fitted for `checkpoint`, keeping the other checkpoint's."""
        atomic_write_json(self.temperature, {**(read_json(self.temperature) or {}), checkpoint: entry})

    def fitted_temperature(self, checkpoint: str, state: dict) -> Optional[float]:
        """The temperature `ipasdctl calibrate` fitted for this checkpoint (`state`, as loaded), None when there
        is none; a UserError when it was fitted on another epoch's checkpoint (export and predict divide by it)."""
        entry = self.read_temperature(checkpoint)
        if entry is None:
            return None
        epoch = int(state.get("epoch", 0))
        if int(entry.get("epoch", -1)) != epoch:
            raise UserError(f"{self.temperature} was fitted on the {checkpoint} checkpoint of epoch "
                            f"{entry.get('epoch')}, but that checkpoint is now epoch {epoch}; run `ipasdctl calibrate "
                            f"{self.path} --checkpoint {checkpoint}` again")
        return float(entry["temperature"])

    def save_checkpoint(self, state: dict, best: bool = False) -> None:
        """best.pt before last.pt: a kill or a full disk between the two leaves last.pt at the previous
        checkpoint, so the resumed run repeats the epoch and writes best.pt again; never a last.pt that says
        finished beside a missing best.pt."""
        if best:
            save_checkpoint(self.best, state)
        save_checkpoint(self.last, state)

    def remove_stale_temporaries(self) -> None:
        """The temporary files a killed writer left (call it holding the lock: no writer is alive then)."""
        for folder in (self.path, self.checkpoints):
            remove_temporaries(folder)

    def remove_partial(self, created: bool) -> None:
        """Leave no half run: the whole folder if this run created it, else the files a run writes."""
        if created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for path in (self.config, self.metrics, self.summary, self.splits, self.temperature):
            try:
                path.unlink()
            except OSError:
                pass
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        shutil.rmtree(self.tensorboard, ignore_errors=True)


def read_json(path: Path) -> Optional[dict]:
    """A JSON object file as a dict; None when missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None



def load_model(run_dir: Path, checkpoint: str = "best", device: str = "cpu"):
    """(model in eval mode, checkpoint state, recipe) of a run folder, weights loaded weights-only; weights that
    do not fit the architecture, or are not finite, are one line."""
    folder = RunFolder(run_dir)
    state = folder.load_state(checkpoint)
    path = folder.checkpoint(checkpoint)
    recipe = recipe_from_dict(state["config"])
    arch, num_classes = state.get("arch", recipe.model.arch), state["num_classes"]
    model = build_model(arch, num_classes, recipe.model.structure)  # a pruned run: the shapes its config records
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # missing or unexpected keys, tensors of another shape (another class count)
        detail = one_line(exc, 200)
        raise UserError(f"{path} does not hold the weights of a {arch} with {num_classes} classes ({detail}); "
                        "use a checkpoint written by `ipasdctl train`") from None
    bad = [name for name, value in state["model"].items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise UserError(f"{path} holds non-finite weights ({', '.join(bad[:3])}); the run diverged: use the run's "
                        "other checkpoint, or train again with a lower lr")
    model.to(resolve_device(device)).eval()
    return model, state, recipe


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    atomic_write_text(path, rows_csv_text(columns, rows, _metrics_cell))


def _metrics_cell(value):
    """A metrics.csv cell: floats to 6 significant digits (what a curve needs), text neutralised."""
    return f"{value:.6g}" if isinstance(value, float) else neutral_cell(value)


# ------------------------------------------------------------------------------------------------ creation


def check_out_folder(out: Path) -> None:
    """--out must be a writable folder, or creatable below its nearest existing parent folder."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == out:
            raise UserError(f"--out {out} is a file, not a folder; choose a folder for the run folders")
        raise UserError(f"cannot create output folder {out}: {existing} is a file, not a folder; "
                        "choose a writable --out")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        what = "output folder" if existing == out else f"output folder {out} cannot be created: its parent"
        raise UserError(f"{what} {existing} is not writable; choose another --out")


def check_run_name(name: str) -> str:
    """A run folder name must be a plain folder name: never a path that leads out of --out."""
    if not name or name.startswith(".") or any(sep in name for sep in ("/", "\0", os.sep, os.altsep or "/")):
        raise UserError(f"--name {name!r} must be a plain folder name (no '/', not '..', not hidden); "
                        "the run folder is created inside --out")
    return name


def create_run_dir(out: Path, name: str) -> Path:
    """out/name, or out/name-2, -3, ... if taken; created atomically (two runs never share one)."""
    n = 1
    while True:
        candidate = out / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise UserError(f"cannot create run folder {candidate}: {exc.strerror}; choose a writable --out") from None
