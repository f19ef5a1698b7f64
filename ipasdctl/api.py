"""The Python API: the functions behind the commands, returning paths, records and dataclasses (nothing printed
unless `progress=True`). `from ipasdctl import train, tune, compare, prune, evaluate, export_onnx, bench, predict,
load_model`.

    from ipasdctl import train, export_onnx, predict
    run = train("demo", out="runs", overrides={"train": {"epochs": 5}})
    record = export_onnx(run, "exports", int8=True)
    print(predict(record["onnx_path"], ["digit.png"])[0].classes)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Optional, Union

from .analysis.evaluation import eval_onnx_model, eval_run
from .config import Recipe, ResolvedRecipe, deep_merge, load_recipe, recipe_from_dict
from .deploy import bench, export_onnx
from .deploy.predict import Prediction, predict
from .runs import RunFolder, load_model
from .studies import compare as comparing
from .studies import plan as planning
from . import training

RecipeLike = Union[Recipe, str, Path]


def recipe_of(recipe: RecipeLike = "demo", overrides: Optional[dict] = None) -> ResolvedRecipe:
    """The resolved recipe (defaults filled in, values checked) of one given (copied, with `overrides` merged
    over it), or of a name in recipes/ or a YAML path."""
    if isinstance(recipe, Recipe):
        given = copy.deepcopy(recipe) if not overrides else recipe_from_dict(deep_merge(recipe.to_dict(), overrides))
    else:
        given = load_recipe(str(recipe), overrides)
    return training.resolve_recipe(given)


def train(recipe: RecipeLike = "demo", out: Union[str, Path] = "runs", name: Optional[str] = None,
          overrides: Optional[dict] = None, progress: bool = False) -> Path:
    """Train one run; returns its run folder. `overrides`: nested recipe keys, e.g. {"train": {"epochs": 5}}."""
    return Path(training.train(recipe_of(recipe, overrides), Path(out), name, training.Progress(enabled=progress)))


def compare(recipe: RecipeLike = "demo", baselines: Union[str, Iterable[str]] = (), seeds: Iterable[int] = (0, 1, 2),
            out: Optional[Union[str, Path]] = None, overrides: Optional[dict] = None,
            progress: bool = False, tuned: Iterable[Union[str, Path]] = (),
            baseline_params: Optional[dict] = None) -> Path:
    """Train the recipe's method, the baselines and ce with every seed (resumable) and write the tables;
    returns the comparison folder (results.csv, summary.csv, summary.md). `tuned`: study folders of `tune`,
    whose methods run at their best trial's parameters; `baseline_params`: a method's own parameters, e.g.
    {"kd": {"teacher": "runs/teacher"}}."""
    from .studies import tuned as tuned_runs

    plan = planning.plan(recipe_of(recipe, overrides), baselines, seeds, Path(out) if out is not None else None,
                         tuned_runs.read_tuned(tuned), baseline_params)
    comparing.run(plan, training.Progress(enabled=progress), comparing.say_on_stderr if progress else None)
    return plan.out


def tune(recipe: RecipeLike = "demo", trials: int = 20, out: Optional[Union[str, Path]] = None,
         space: Optional[Union[str, Path]] = None, storage: Optional[str] = None, pruner: str = "median",
         overrides: Optional[dict] = None, progress: bool = False, jobs: Optional[int] = None,
         devices: Optional[str] = None, threads_per_job: Optional[int] = None, ray: Optional[str] = None) -> Path:
    """An Optuna study of the recipe's method on its validation split (resumable: a rerun continues it); returns
    the study folder (trials.csv, best.yaml, summary.md, plots/). Needs pip install 'ipasdctl[tune]'. `jobs`,
    `devices`, `threads_per_job`, `ray`: several trials at once, as `ipasdctl tune --jobs/--devices/
    --threads-per-job/--ray` (Ray already initialised by the caller is used as it is)."""
    from .studies import tune as tuning
    from .studies.executors import make_executor

    settings = tuning.TuneSettings(trials=trials, out=Path(out) if out is not None else None,
                                   space=Path(space) if space is not None else None, storage=storage, pruner=pruner)
    settings.check()
    resolved = recipe_of(recipe, overrides)
    executor = make_executor(resolved, jobs, devices, threads_per_job, ray, training.Progress(enabled=False))
    return tuning.run(resolved, settings, progress, tuning.say_on_stderr if progress else None, executor)


def prune(run: Union[str, Path], target_macs: Optional[float] = None, target_latency_ms: Optional[float] = None,
          importance: str = "magnitude", steps: int = 1, method: Optional[str] = None, epochs: Optional[int] = None,
          out: Optional[Union[str, Path]] = None, name: Optional[str] = None, overrides: Optional[dict] = None,
          progress: bool = False, **settings) -> Path:
    """Prune a finished run to a share of its MACs or a batch-1 latency and recover it by training; returns the
    pruned run folder (beside the run unless `out`). `settings`: the other fields of compress.PruneSettings
    (round_to, lr_scale, teacher_original, checkpoint, data, device); `overrides`: recipe keys of the recovery."""
    from .compress import DEFAULT_EPOCHS, PruneSettings, prune_run

    chosen = PruneSettings(target_macs=target_macs, target_latency_ms=target_latency_ms, importance=importance,
                           steps=steps, method=method, epochs=DEFAULT_EPOCHS if epochs is None else epochs,
                           overrides=dict(overrides or {}), **settings)
    return Path(prune_run(Path(run), chosen, Path(out) if out is not None else None, name,
                          progress=training.Progress(enabled=progress)))


def evaluate(target: Union[str, Path], checkpoint: str = "best", data: Optional[Union[str, Path]] = None,
             device: str = "auto") -> dict:
    """eval.json of a run folder's checkpoint, or of an exported .onnx model (written beside it, and returned)."""
    target = Path(target)
    data = Path(data) if data is not None else None
    if target.suffix.lower() == ".onnx":
        return eval_onnx_model(target, data)
    return eval_run(target, checkpoint, data, device)


__all__ = ["Prediction", "Recipe", "RunFolder", "bench", "compare", "evaluate", "export_onnx", "load_model",
           "load_recipe", "predict", "prune", "recipe_of", "train", "tune"]

