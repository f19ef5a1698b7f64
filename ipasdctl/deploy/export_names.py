"""What an export is called, which files make one exported model, and which run those files belong to.

- Name: `<dataset>-<arch>-<method>-s<seed>` from the run's own recipe (runs.default_run_name, as a plain
  `train` run is named), `-last` added for the last checkpoint; `--name` overrides it. The folder name is not
  used: runs of a comparison are called `<method>-s<seed>`, which says nothing of the data set or the model.
- The files of the model NAME in an export folder: `NAME.*` and `NAME<suffix>.*` for each export format's
  suffix (`NAME-int8.*`, `NAME-fp16.*`: the models, their external data, their jsons, and what `eval` wrote
  beside them: `.eval.json`, `.per_class.csv`, `.reliability.png`). They are replaced together, never one of
  them alone: a fresh fp32 model beside an older INT8 model or eval json would be read as one model.
- Owner: the run folder recorded in `NAME.json` (or another format's `NAME<suffix>.json`). Exporting another run under a name
  that is taken is refused (one line, exit 2) unless `overwrite`; files of the name that no json claims are
  refused the same way, since nothing says whose they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..config import Recipe, recipe_from_dict
from ..errors import UserError
from ..runs import RunFolder, default_run_name, read_json
from .formats import FORMATS, get_format


def format_stems(name: str) -> list[str]:
    """The file stems of the model `name` in every registered format: NAME, NAME-int8, NAME-fp16, ..."""
    return list(dict.fromkeys([name] + [f"{name}{get_format(f).suffix}" for f in FORMATS.names()]))


def export_name(recipe: Recipe, checkpoint: str = "best", name: Optional[str] = None) -> str:
    """The file stem of a run's export: `name` when given, else what the model is (see the module docstring)."""
    if name is None:
        return default_run_name(recipe) + ("" if checkpoint == "best" else f"-{checkpoint}")
    return check_name(name)


def check_name(name: str) -> str:
    if "/" in name or "\\" in name or name.startswith(".") or not name.strip():
        raise UserError(f"--name '{name}' must be a plain file name (no folders, not hidden)")
    return name


def planned_name(run_dir: Path, checkpoint: str = "best", name: Optional[str] = None) -> str:
    """export_name from the run folder's config.yaml (a cheap look before the checkpoint is loaded)."""
    if name is not None:
        return check_name(name)
    folder = RunFolder(run_dir)
    if not folder.path.exists():
        raise UserError(f"run folder {folder.path} does not exist; pass a run folder written by `ipasdctl train`")
    config = folder.read_config()
    if config is None:
        raise UserError(f"{folder.path} is not a run folder (no config.yaml in it); pass a folder written by "
                        "`ipasdctl train`")
    return export_name(recipe_from_dict(config), checkpoint)


def model_files(out_dir: Path, name: str) -> list[Path]:
    """Every file of the exported model `name` in `out_dir` (in every format, with what eval wrote beside them)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    prefixes = tuple(f"{stem}." for stem in format_stems(name))
    return sorted(p for p in out_dir.iterdir() if p.name.startswith(prefixes) and not p.is_dir())


def recorded_source(out_dir: Path, name: str) -> Optional[str]:
    """The run folder the model `name` in `out_dir` was exported from (its json's run_dir), or None."""
    for stem in format_stems(name):
        run_dir = (read_json(Path(out_dir) / f"{stem}.json") or {}).get("run_dir")
        if isinstance(run_dir, str) and run_dir:
            return run_dir
    return None


def check_owner(out_dir: Path, name: str, run_dir: Path, overwrite: bool = False) -> list[Path]:
    """The files of `name` in `out_dir` that exporting `run_dir` will replace; a UserError when they belong to
    another run (or to none recorded) and `overwrite` is not set."""
    existing = model_files(out_dir, name)
    if not existing or overwrite:
        return existing
    source = recorded_source(out_dir, name)
    mine = str(Path(run_dir).resolve())
    if source is not None and _same_path(source, mine):
        return existing
    where = Path(out_dir) / f"{name}.onnx"
    if source is None:
        shown = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise UserError(f"{Path(out_dir)} already holds files of '{name}' ({shown}) that no {name}.json says the "
                        f"source of; pass --overwrite to replace all of them with the export of {mine}, or "
                        "choose another --out or --name")
    raise UserError(f"{where} was exported from another run ({source}), not from {mine}; pass --overwrite to "
                    "replace all of its files, or choose another --out or --name")


def check_targets(run_dirs: Sequence[Path], out_dir: Path, checkpoint: str = "best", name: Optional[str] = None,
                  overwrite: bool = False) -> list[str]:
    """The export names of `run_dirs` (before any is exported): two runs that would share a name, or a name whose
    files belong to another run, are one line."""
    names: dict[str, Path] = {}
    for run_dir in run_dirs:
        stem = planned_name(run_dir, checkpoint, name)
        if stem in names:
            raise UserError(f"{names[stem]} and {run_dir} would both be exported as {stem}; export them into "
                            "separate --out folders")
        names[stem] = Path(run_dir)
        check_owner(out_dir, stem, run_dir, overwrite)
    return list(names)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return a == b
