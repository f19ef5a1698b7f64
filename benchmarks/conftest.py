"""Benchmarks run on demand (`make bench`), never in the test suite. Real CIFAR-10 is used when
IPASDCTL_CIFAR (the folder holding cifar-10-batches-py/) is set, else CIFAR-10-shaped synthetic data."""

import os

import pytest


@pytest.fixture(scope="session")
def cifar_root():
    return os.environ.get("IPASDCTL_CIFAR")


def report(title: str, rows: list[dict]) -> None:
    """Print a small aligned table under a title (pytest -s shows it)."""
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row[c]).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
