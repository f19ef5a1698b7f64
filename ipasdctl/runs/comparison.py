"""The comparison folder (`ipasdctl compare`): the one module that knows its layout.

    <comparison>/comparison.yaml      the shared recipe (method = the main method's, no seed), the methods, the seeds
    <comparison>/<method>-s<seed>/    one ordinary run folder per method and seed (`run(method, seed)`)
    <comparison>/results.csv          one row per planned run (RESULT_COLUMNS and its status)
    <comparison>/summary.csv, .md     per method: the statistics over seeds (studies/summary.py writes them)
    <comparison>/tuning/<method>/     `compare --tune N`: the study folder of each tuned method (runs/study.py)
    <comparison>/.lock                held by the one `compare` that runs in the folder
    <comparison>/report.md, ...       `ipasdctl report` (analysis/report.py names its files)

studies/ writes a comparison folder through `ComparisonFolder`; analysis/ reads it through `ComparisonFolder`
too, never through studies (import-linter checks it).
"""

from __future__ import annotations

from pathlib import Path

from .folder import RunFolder
from .lock import RunLock


def comparison_run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


class ComparisonFolder:
    """One comparison folder: where each of its files is."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ComparisonFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def record(self) -> Path:
        return self.path / "comparison.yaml"

    @property
    def results(self) -> Path:
        return self.path / "results.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.csv"

    @property
    def summary_markdown(self) -> Path:
        return self.path / "summary.md"

    def run(self, method: str, seed: int) -> RunFolder:
        """The run folder of `method` with `seed`."""
        return RunFolder(self.path / comparison_run_name(method, seed))

    def study(self, method: str) -> Path:
        """The study folder `compare --tune` tunes `method` in."""
        return self.path / "tuning" / method

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def is_comparison(self) -> bool:
        """A comparison's tables are written: what `report` and the selection table read."""
        return self.path.is_dir() and self.results.is_file()
