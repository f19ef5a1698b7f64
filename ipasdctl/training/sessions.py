"""The entry points of training: a new run (`train`, `train_into`) and the continuation of one (`resume`).

A run folder is locked (runs.RunLock) while a process trains into it; the kernel drops the lock when that
process dies, even by SIGKILL, so a crashed run never leaves it locked. A new run that fails before its first
checkpoint removes its run folder: bad input never leaves half a run behind. Under torchrun every rank calls
these; rank 0 creates, locks and writes the run folder. Each takes a recipe resolved by its caller (the API, the
CLI, compare's plan) and resolves a plain one itself; a recipe read from a run folder is resolved where it is read.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from ..config import Recipe, ResolvedRecipe, deep_merge, differing_keys, load_recipe, recipe_from_dict
from ..errors import UserError
from ..runs import RunFolder, check_out_folder, check_run_name, create_run_dir, default_run_name
from . import distributed
from .progress import Progress
from .resolve import resolve_recipe, resolved, resolved_dict
from .stopping import Interrupted
from .trainer import Trainer


def train(recipe: Recipe, out: Path, name: Optional[str] = None, progress: Optional[Progress] = None,
          reuse: bool = False) -> Path:
    """A new run: validate and build everything first, then create the run folder and train. Under torchrun
    every rank calls this; rank 0 creates the run folder and the others learn its name from it.

    `reuse`: when out/name already holds a run of exactly this recipe, return it if finished and resume it if
    interrupted, instead of starting another (name-2) beside it (what a rerun chain wants)."""
    recipe = resolved(recipe)
    out = Path(out)
    if reuse:
        reused = _same_run(recipe, out / (name or default_run_name(recipe)), progress)
        if reused is not None:
            return reused
    with distributed.session(clean_exits=(Interrupted,)):
        if name is not None:
            check_run_name(name)
        check_out_folder(out)  # before the (slow) data loading: fail fast
        trainer = Trainer(recipe, None, progress)

        def create() -> Path:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create output folder {out}: {exc.strerror}; choose a writable --out") from None
            check_out_folder(out)
            return create_run_dir(out, name or default_run_name(recipe))

        run_dir = distributed.on_main(trainer.dist, create)
        return _train_new(trainer, run_dir, created=True)


def _same_run(recipe: ResolvedRecipe, run_dir: Path, progress: Optional[Progress]) -> Optional[Path]:
    """run_dir when it holds a finished run of this recipe; resumed to the end when it holds an interrupted one;
    else None."""
    folder = RunFolder(run_dir)
    try:
        saved = folder.read_config()
        if saved is None:
            return None
        saved = resolve_recipe(recipe_from_dict(saved))  # a config.yaml from before a key existed gets its default
    except UserError:
        return None
    if saved.to_dict() != recipe.to_dict():
        return None
    state = folder.state()
    if state == "finished":
        (progress or Progress()).note(f"{folder.path}: finished with this recipe, reused")
        return folder.path
    if state == "resumable":
        return resume(folder.path, None, progress)
    return None


def train_into(recipe: Recipe, run_dir: Path, progress: Optional[Progress] = None) -> Path:
    """A new run in exactly `run_dir` (which must not hold a run yet); used by `compare`."""
    recipe = resolved(recipe)
    folder = RunFolder(run_dir)
    with distributed.session(clean_exits=(Interrupted,)):
        trainer = Trainer(recipe, None, progress)

        def create() -> bool:
            if folder.config.exists():
                raise UserError(f"{folder.path} already holds a run; resume it with --resume or choose another folder")
            created = not folder.path.exists()
            try:
                folder.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create run folder {folder.path}: {exc.strerror}; choose a writable --out") from None
            return created

        created = distributed.on_main(trainer.dist, create)
        return _train_new(trainer, folder.path, created)


def resume(run_dir: Path, recipe: Optional[Recipe] = None, progress: Optional[Progress] = None) -> Path:
    """Continue `run_dir` from checkpoints/last.pt; the recipe, if given, must be the run's own. Any number of
    processes can resume a checkpoint of any number (each reads the checkpoint; rank 0 holds the lock)."""
    folder = RunFolder(run_dir)
    with distributed.session(clean_exits=(Interrupted,)) as ctx:
        if not folder.path.is_dir():
            raise UserError(f"--resume {folder.path}: no such run folder; give the folder that `ipasdctl train` printed")
        lock = folder.lock()
        distributed.on_main(ctx, lock.acquire)
        try:
            if not folder.last.is_file():
                raise UserError(f"--resume {folder.path}: it has no checkpoints/last.pt (the run stopped before its "
                                "first checkpoint); start a new run instead")
            state = folder.load_state("last")
            saved = resolve_recipe(recipe_from_dict(state["config"]))
            if distributed.on_main(ctx, functools.partial(_check_folder_agrees, folder, state)) and ctx.is_main:
                folder.write_config(saved)  # config.yaml was missing: the checkpoint's recipe is the run's
            if recipe is not None:
                given = resolved(recipe)
                if given.to_dict() != saved.to_dict():
                    diff = sorted(differing_keys(saved.to_dict(), given.to_dict()))
                    raise UserError(f"--resume {folder.path}: the given recipe differs from the run's ({', '.join(diff)}); "
                                    "resume without recipe options, or start a new run")
            summary = folder.read_summary() if folder.state() == "finished" else None
            trainer = Trainer(saved, folder.path, progress)
            trainer.load_state_dict(state)  # the checkpoint is checked whole, finished or not
            if trainer.dist.is_main:
                folder.remove_stale_temporaries()  # of a process killed mid-write (we hold the lock)
            del state
            if summary is not None and trainer.epoch >= saved.train.epochs and folder.best.is_file():
                if ctx.is_main:
                    best = float("nan") if summary.best_top1 is None else summary.best_top1
                    (progress or Progress()).note(
                        f"{folder.path} already finished ({trainer.epoch}/{saved.train.epochs} epochs, best test "
                        f"top-1 {best:.2f}%): nothing to resume")
                return folder.path
            if ctx.is_main:
                (progress or Progress()).note(f"resuming {folder.path} at {_resume_point(trainer)}")
            trainer.run()
        finally:
            lock.release()
    return folder.path


def _resume_point(trainer: Trainer) -> str:
    """Where a resumed run goes on: 'epoch 3/30, step 12/40 (92 steps done)', or the start of an epoch."""
    epoch, epochs = trainer.epoch + 1, trainer.recipe.train.epochs
    step, steps = trainer.step_in_epoch, trainer.steps_per_epoch
    if step == 0:
        where = f"the start of epoch {epoch}/{epochs}"
    else:  # every step of the epoch done: a stop came during its test pass, which runs again
        where = f"epoch {epoch}/{epochs}, step {step}/{steps}" + (" (its test pass)" if step >= steps else "")
    return f"{where} ({trainer.global_step} steps done)"


def resume_recipe(run_dir: Path, recipe: Optional[str], overrides: Optional[dict]) -> Optional[Recipe]:
    """The recipe a `train --resume` command line asks for, to compare with the run's own: the named recipe
    (with the options over it), or, without --recipe, the run's saved recipe with the options over it; None
    when the command line gives neither (then the run's recipe is used as it is). `resume` resolves it, after
    its checks of the run folder."""
    if recipe:
        return load_recipe(recipe, overrides)
    if not overrides:
        return None
    folder = RunFolder(run_dir)
    if not folder.last.is_file():
        return None  # resume() reports the missing run folder / checkpoint
    saved = folder.load_state("last").get("config")  # the checkpoint's recipe is the run's (not config.yaml)
    if not isinstance(saved, dict):
        return None  # resume() reports the damaged checkpoint
    merged = deep_merge(saved, overrides)
    saved_method, new_method = (saved.get("method") or {}).get("name"), overrides.get("method")
    if isinstance(new_method, dict) and new_method.get("name", saved_method) != saved_method:
        merged["method"] = new_method  # another method: the saved one's parameters do not apply to it
    return recipe_from_dict(merged)


def _check_folder_agrees(folder: RunFolder, state: dict) -> bool:
    """The run folder must not contradict its checkpoint (the truth): config.yaml is the checkpoint's recipe
    and metrics.csv holds no more epochs than it. True when config.yaml is missing (resume writes it)."""
    try:
        on_disk = folder.read_config()
    except UserError:
        on_disk = ""  # not YAML: as unreadable as YAML that is no mapping
    if on_disk is not None and not isinstance(on_disk, dict):
        raise UserError(f"--resume {folder.path}: its config.yaml is not readable YAML, so the folder no longer "
                        "says what the run is; the recipe in checkpoints/last.pt is the run's: remove config.yaml "
                        "(resume writes it again from the checkpoint) and resume")
    # resolved: a run written by an older version may record keys since added or dropped; only values differ
    diff = differing_keys(resolved_dict(state["config"]), resolved_dict(on_disk)) if on_disk is not None else []
    if diff:
        raise UserError(f"--resume {folder.path}: config.yaml disagrees with the recipe in checkpoints/last.pt "
                        f"({', '.join(diff[:5])}); was config.yaml edited, or last.pt copied from another run? The "
                        "checkpoint's recipe is the run's: remove config.yaml to have it written from the "
                        "checkpoint, or start a new run")
    done, rows = folder.epochs_done(), len(state.get("rows") or [])
    if done > rows:
        raise UserError(f"--resume {folder.path}: metrics.csv records {done} epochs but checkpoints/last.pt only "
                        f"{rows}; last.pt is older than the run (copied from elsewhere?): put the run's own last.pt "
                        "back, or start a new run")
    return on_disk is None


def _train_new(trainer: Trainer, run_dir: Path, created: bool) -> Path:
    """Train a new run into `run_dir`; if it fails before its first checkpoint, leave no run behind.
    Under several processes rank 0 alone locks and writes the folder."""
    main = trainer.dist.is_main
    folder = trainer.folder = RunFolder(run_dir)
    lock = folder.lock()
    try:
        distributed.on_main(trainer.dist, lock.acquire)
    except UserError:
        if created and main:
            folder.remove_partial(created=True)
        raise
    try:
        if main:
            folder.remove_stale_temporaries()  # a folder compare made earlier may hold some
            folder.write_config(trainer.recipe, trainer.weights.to_dict() if trainer.weights is not None else None)
        trainer.run()
    except BaseException as exc:
        if main and not isinstance(exc, Interrupted) and not folder.last.exists():
            lock.release()
            folder.remove_partial(created)
        raise
    finally:
        lock.release()
    return folder.path

