"""The package version (pyproject.toml reads it from here), and how to add an optional extra to this copy."""

from pathlib import Path

__version__ = "0.1.0"

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # a source checkout when it holds pyproject.toml


def install_command(extra: str, source_root: Path = SOURCE_ROOT) -> str:
    """The pip command that adds `extra` to the ipasdctl that is running: from its source checkout when it runs
    from one (an editable install, or the checkout on PYTHONPATH), where `pip install 'ipasdctl[x]'` would fetch
    another copy from the package index; from the index when it is installed from a wheel."""
    if not (source_root / "pyproject.toml").is_file():
        return f"pip install 'ipasdctl[{extra}]'"
    where = "." if Path.cwd().resolve() == source_root else str(source_root)
    return f"pip install -e '{where}[{extra}]'"
