"""The study folder (`ipasdctl tune`): the one module that knows its layout.

    <study>/study.yaml          what the study is: the base recipe, the method, the space, the storage, the target
    <study>/study.db            the Optuna storage (SQLite) unless --storage names another database
    <study>/trial-<NNNN>/       one ordinary run folder per trial (`trial(number)`)
    <study>/trials.csv          every trial: parameters, state, val top-1, epochs run, seconds
    <study>/best.yaml           the recipe overrides of the best trial (what `compare --tuned` runs)
    <study>/summary.md          the study in words: best trial, space, pruning, the table
    <study>/plots/*.png         Optuna's optimisation history and parameter importances
    <study>/.lock               held by the one `tune` that runs in the folder
"""

from __future__ import annotations

from pathlib import Path

from .folder import RunFolder
from .lock import RunLock


def trial_run_name(number: int) -> str:
    return f"trial-{number:04d}"


class StudyFolder:
    """One study folder: where each of its files is."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StudyFolder({str(self.path)!r})"

    @property
    def record(self) -> Path:
        return self.path / "study.yaml"

    @property
    def database(self) -> Path:
        return self.path / "study.db"

    @property
    def default_storage(self) -> str:
        return f"sqlite:///{self.database.resolve()}"

    @property
    def trials(self) -> Path:
        return self.path / "trials.csv"

    @property
    def best(self) -> Path:
        return self.path / "best.yaml"

    @property
    def summary_markdown(self) -> Path:
        return self.path / "summary.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def trial(self, number: int) -> RunFolder:
        """The run folder of trial `number`."""
        return RunFolder(self.path / trial_run_name(number))

    def run(self, name: str) -> RunFolder:
        return RunFolder(self.path / name)

    def is_study(self) -> bool:
        return self.record.is_file()

    def lock(self) -> RunLock:
        return RunLock(self.path)
