"""The entry points of training: a new run (`train`, `train_into`) and the continuation of one (`resume`).

A run folder is locked (runs.RunLock) while a process trains into it; the kernel drops the lock when that
process dies, even by SIGKILL, so a crashed run never leaves it locked. A new run that fails before its first
checkpoint removes its run folder: bad input never leaves half a run behind. Under torchrun every rank calls
these; rank 0 creates, locks and writes the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Recipe, deep_merge, differing_keys, load_recipe, recipe_from_dict
from ..errors import UserError
from ..files import load_checkpoint
from ..runs import RunFolder, check_out_folder, create_run_dir, default_run_name
from . import distributed
from .checks import check_recipe
from .progress import Progress
from .stopping import Interrupted
from .trainer import Trainer


def train(recipe: Recipe, out: Path, name: Optional[str] = None, progress: Optional[Progress] = None) -> Path:
    """A new run: validate and build everything first, then create the run folder and train. Under torchrun
    every rank calls this; rank 0 creates the run folder and the others learn its name from it."""
    out = Path(out)
    with distributed.session(clean_exits=(Interrupted,)):
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


def train_into(recipe: Recipe, run_dir: Path, progress: Optional[Progress] = None) -> Path:
    """A new run in exactly `run_dir` (which must not hold a run yet); used by `compare`."""
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
            state = load_checkpoint(folder.last)
            saved = recipe_from_dict(state["config"])
            if recipe is not None:
                check_recipe(recipe)
                check_recipe(saved)
                if recipe.to_dict() != saved.to_dict():
                    diff = sorted(differing_keys(saved.to_dict(), recipe.to_dict()))
                    raise UserError(f"--resume {folder.path}: the given recipe differs from the run's ({', '.join(diff)}); "
                                    "resume without recipe options, or start a new run")
            summary = folder.read_summary() if folder.state() == "finished" else None
            if summary is not None and int(state["epoch"]) >= saved.train.epochs:
                if ctx.is_main:
                    (progress or Progress()).note(
                        f"{folder.path} already finished ({state['epoch']}/{saved.train.epochs} epochs, best test "
                        f"top-1 {summary.get('best_top1', float('nan')):.2f}%): nothing to resume")
                return folder.path
            trainer = Trainer(saved, folder.path, progress)
            trainer.load_state_dict(state)
            del state
            trainer.run()
        finally:
            lock.release()
    return folder.path


def resume_recipe(run_dir: Path, recipe: Optional[str], overrides: Optional[dict]) -> Optional[Recipe]:
    """The recipe a `train --resume` command line asks for, to compare with the run's own: the named recipe
    (with the options over it), or, without --recipe, the run's saved recipe with the options over it; None
    when the command line gives neither (then the run's recipe is used as it is)."""
    if recipe:
        return load_recipe(recipe, overrides)
    if not overrides:
        return None
    try:
        saved = RunFolder(run_dir).read_config()
    except UserError:
        return None
    if saved is None:
        return None  # resume() reports the missing run folder / checkpoint
    merged = deep_merge(saved, overrides)
    saved_method, new_method = (saved.get("method") or {}).get("name"), overrides.get("method")
    if isinstance(new_method, dict) and new_method.get("name", saved_method) != saved_method:
        merged["method"] = new_method  # another method: the saved one's parameters do not apply to it
    return recipe_from_dict(merged)


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
            folder.write_config(trainer.recipe)
        trainer.run()
    except BaseException as exc:
        if main and not isinstance(exc, Interrupted) and not folder.last.exists():
            lock.release()
            folder.remove_partial(created)
        raise
    finally:
        lock.release()
    return folder.path

