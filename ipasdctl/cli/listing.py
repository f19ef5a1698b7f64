"""`ipasdctl list`: the registered methods, models, data sets, export formats and the recipes.

The registries fill by importing every method, model, data set and format module, which imports torch
(seconds). Their names and the model table are therefore kept in a cache file (`IPASDCTL_CACHE_DIR`, default
~/.cache/ipasdctl/catalog.json) under a fingerprint of those modules' files and the torch/torchvision versions:
a change to any of them recomputes it, and an unwritable cache only means computing every time.
"""

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from .app import app
from .options import QuietOpt

CACHE_ENV = "IPASDCTL_CACHE_DIR"
REGISTERED_PACKAGES = ("methods", "models", "data", "deploy/formats")  # the packages whose modules fill the registries


@app.command("list")
def list_(
    what: Annotated[Optional[str], typer.Argument(
        metavar="[methods|models|datasets|formats|recipes]", help="What to list (default: all, by name); with --models, a "
             "timm pattern such as 'timm:*mobilenet*' lists timm's models.")] = None,
    models: Annotated[bool, typer.Option("--models", help="A table of every model: input size, parameters, MACs.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Print the registered methods, models, data sets, export formats and recipes.

    `list methods`: each method with a one-line description; `list formats`: each export format, its file, what
    it is made from and how it is validated; `list --models`: every model's size."""
    from ..config import RECIPES_DIR
    from ..errors import UserError

    if models:
        if what is not None and what.startswith("timm:"):  # timm's zoo: not cached (timm's version decides it)
            typer.echo(format_table(_timm_table(what, quiet)))
            return
        typer.echo(format_table(cached("model_table", lambda: _model_table(quiet))))
        return
    groups = {**cached("names", _registered_names), "recipes": sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))}
    if what is not None and what not in groups:
        raise UserError(f"list takes one of {', '.join(groups)}, got '{what}'")
    if what in ("methods", "formats"):
        summaries = cached(f"{what[:-1]}_summaries", _method_summaries if what == "methods" else _format_summaries)
        width = max(len(name) for name in summaries)
        typer.echo("\n".join(f"{name.ljust(width)}  {summary}" for name, summary in summaries.items()))
        return
    for group, names in groups.items():
        if what in (None, group):
            typer.echo(f"{group}: {', '.join(names)}")


def format_table(rows: list[dict]) -> str:
    """A plain-text table: name, input, classes, params (M), MACs (M or G), embedding width, stages."""
    def human(value: int) -> str:
        return f"{value / 1e9:.2f}G" if value >= 1e9 else f"{value / 1e6:.1f}M"

    header = ("model", "input", "classes", "params", "MACs", "embed", "stages")
    lines = [(r["name"], f"{r['input_size']}x{r['input_size']}", str(r["num_classes"]), human(r["params"]),
              human(r["macs"]), str(r["embed_dim"]), str(r["num_stages"])) for r in rows]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for line in lines:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def _registered_names() -> dict:
    from ..data import DATASETS
    from ..deploy.formats import FORMATS
    from ..methods import METHODS
    from ..models import MODELS

    return {"methods": METHODS.names(), "models": MODELS.names(), "datasets": DATASETS.names(),
            "formats": FORMATS.names()}


def _method_summaries() -> dict:
    """Method name -> its declared one-line `summary`, else the first line of its class docstring."""
    from ..methods import METHODS

    def summary(method) -> str:
        return method.summary or ((method.__doc__ or "").strip().splitlines() or ["(no description)"])[0]

    return {name: summary(METHODS.get(name)) for name in METHODS.names()}


def _format_summaries() -> dict:
    """Export format -> its file, precision, what it is made from, its summary and how it is validated."""
    from ..deploy.formats import FORMATS, get_format

    def summary(fmt) -> str:
        source = f"from {fmt.made_from}" if fmt.made_from else "from PyTorch"
        return f"{fmt.file_name('NAME')}, {fmt.precision}, {source}: {fmt.summary_line}; validated {fmt.tolerance}"

    return {name: summary(get_format(name)) for name in FORMATS.names()}


def _model_table(quiet: bool) -> list[dict]:
    """Every model's row, with a bar on a terminal (all the models' MACs take a while on a small CPU)."""
    from tqdm import tqdm

    from ..models import MODELS
    from ..models.catalog import model_row

    names = tqdm(MODELS.names(), desc="counting parameters and MACs", file=sys.stderr, leave=False,
                 disable=True if quiet else None)
    return [model_row(name) for name in names]


def _timm_table(pattern: str, quiet: bool) -> list[dict]:
    """The rows of every timm model matching `pattern` (timm:<glob>), each at its own input size."""
    from tqdm import tqdm

    from ..errors import UserError
    from ..models.catalog import model_row
    from ..models.timm_models import timm_model_names

    names = timm_model_names(pattern)
    if not names:
        raise UserError(f"no timm model matches '{pattern}'; try a wider pattern such as 'timm:*net*'")
    return [model_row(name, num_classes=1000) for name in tqdm(names, desc="counting parameters and MACs",
                                                               file=sys.stderr, leave=False,
                                                               disable=True if quiet else None)]


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ipasdctl"
    return Path(root) / "catalog.json"


def fingerprint() -> str:
    """Changes whenever a method, model or data set module, ipasdctl, torch or torchvision changes."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    for folder in REGISTERED_PACKAGES:
        for path in sorted((package / folder).glob("*.py")):
            stat = path.stat()
            digest.update(f"{folder}/{path.name} {stat.st_mtime_ns} {stat.st_size}\n".encode())
    for dist in ("torch", "torchvision"):
        try:
            digest.update(f"{dist} {version(dist)}\n".encode())
        except PackageNotFoundError:
            pass
    return digest.hexdigest()


def cached(key: str, compute: Callable[[], object]):
    """`compute()`'s (JSON) value, from the cache when its fingerprint still holds."""
    from ..errors import UserError
    from ..safe_io import atomic_write_json

    path, current = cache_file(), fingerprint()
    try:
        catalog = json.loads(path.read_text())
    except (OSError, ValueError):
        catalog = None
    if not isinstance(catalog, dict) or catalog.get("fingerprint") != current:
        catalog = {"fingerprint": current}
    if key not in catalog:
        catalog[key] = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, catalog)
        except (OSError, UserError):
            pass  # no cache here: computed again next time
    return catalog[key]
