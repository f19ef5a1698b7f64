"""`ipasdctl list`: the registered methods, models, data sets and the recipes."""

from typing import Annotated, Optional

import typer

from .app import app


@app.command("list")
def list_(
    what: Annotated[Optional[str], typer.Argument(help="methods, models, datasets or recipes (default: all).")] = None,
    models: Annotated[bool, typer.Option("--models", help="A table of every model: input size, parameters, MACs.")] = False,
) -> None:
    """Print the registered methods, models, data sets and the recipes in recipes/."""
    from ..config import RECIPES_DIR
    from ..data import DATASETS
    from ..errors import UserError
    from ..methods import METHODS
    from ..models import MODELS

    if models:
        from ..models.catalog import format_table, model_table

        typer.echo(format_table(model_table()))
        return
    groups = {
        "methods": METHODS.names(),
        "models": MODELS.names(),
        "datasets": DATASETS.names(),
        "recipes": sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")),
    }
    if what is not None and what not in groups:
        raise UserError(f"list takes one of {', '.join(groups)}, got '{what}'")
    for group, names in groups.items():
        if what in (None, group):
            typer.echo(f"{group}: {', '.join(names)}")
