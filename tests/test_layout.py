"""The layout rules import-linter cannot check: the file names of run and comparison folders are spelled in
ipasdctl/runs/ only, and no module passes 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path
from tests.helpers import REPO

PACKAGE = REPO / "ipasdctl"
RUN_FOLDER_FILES = {"config.yaml", "metrics.csv", "summary.json", "splits.json", "temperature.json"}
COMPARISON_FOLDER_FILES = {"comparison.yaml", "results.csv", "summary.csv", "summary.md"}


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant of a module but its docstrings (prose may name a file)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_files_of_run_and_comparison_folders_are_named_in_runs_only():
    spelled = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "runs" and path.parent.parent == PACKAGE:
            continue
        spelled += [f"{path.relative_to(PACKAGE)}:{line}: {value}" for line, value in string_literals(path)
                    if value in RUN_FOLDER_FILES | COMPARISON_FOLDER_FILES]
    assert spelled == [], "use runs.RunFolder / runs.ComparisonFolder instead"


def test_the_literal_check_sees_a_path_in_an_f_string(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Reads results.csv."""\n\ndef f(d):\n    return f"{d / \'results.csv\'} is bad"\n')
    assert sorted(string_literals(module)) == [(4, " is bad"), (4, "results.csv")]


def test_no_module_passes_450_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 450}
    assert long == {}
