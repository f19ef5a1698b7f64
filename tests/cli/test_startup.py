"""Fast start: help, version and `list` (its cache warm) never import torch; the list cache is what `list`
prints; shell completion answers; every command takes -q/--quiet. Nothing here is timed (benchmarks/
test_bench_startup.py measures the seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PROBE = """
import sys
from ipasdctl.cli import main
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules, "exit:", code, file=sys.stderr)
"""


def run(args: list[str], cache: Path, **env) -> tuple[str, bool, int]:
    """(stdout, whether torch was imported, exit code) of `ipasdctl ARGS` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "IPASDCTL_CACHE_DIR": str(cache), **env})
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("torch imported:"), done.stderr
    return done.stdout, "torch imported: True" in last, int(last.rsplit(" ", 1)[1])


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["compare", "--help"], ["eval", "--help"],
                                  ["report", "--help"], ["export", "--help"], ["bench", "--help"], ["list", "--help"],
                                  ["--version"]])
def test_help_and_version_do_not_import_torch(args, tmp_path):
    out, torch_imported, code = run(args, tmp_path)
    assert code == 0 and out and not torch_imported


def test_version_names_ipasdctl_and_torch(tmp_path):
    from importlib.metadata import version

    import ipasdctl

    out, _, _ = run(["--version"], tmp_path)
    assert out.strip() == f"ipasdctl {ipasdctl.__version__} (torch {version('torch')})"


def test_list_fills_its_cache_once_then_answers_without_torch(tmp_path):
    cold, torch_imported, code = run(["list"], tmp_path)
    assert code == 0 and torch_imported  # the first `list` imports the registries and writes the cache
    assert (tmp_path / "catalog.json").is_file()
    warm, torch_imported, code = run(["list"], tmp_path)
    assert code == 0 and not torch_imported and warm == cold
    assert "methods: " in warm and "ipasd" in warm and "resnet8" in warm and "digits" in warm
    (tmp_path / "catalog.json").write_text("{not json")  # a broken cache is recomputed, not an error
    again, _, code = run(["list"], tmp_path)
    assert code == 0 and again == cold


def test_list_models_prints_the_cached_table(tmp_path, monkeypatch):
    from ipasdctl.cli import listing

    monkeypatch.setenv(listing.CACHE_ENV, str(tmp_path))
    row = {"name": "cached_net", "input_size": 32, "num_classes": 100, "params": 1234567, "macs": 89000000,
           "embed_dim": 64, "stage_channels": [16, 32, 64], "num_stages": 3}
    listing.cached("model_table", lambda: [row])  # as if an earlier `list --models` had computed it
    out, torch_imported, code = run(["list", "--models", "-q"], tmp_path)
    assert code == 0 and not torch_imported
    assert out.splitlines()[1].split() == ["cached_net", "32x32", "100", "1.2M", "89.0M", "64", "3"]
    assert json.loads((tmp_path / "catalog.json").read_text())["fingerprint"] == listing.fingerprint()


def test_shell_completion_completes_commands_and_options(tmp_path):
    script = Path(sys.executable).parent / "ipasdctl"  # completion keys on the program's name
    if not script.is_file():
        pytest.skip("the ipasdctl console script is not installed beside this interpreter")

    def complete(words: str) -> list[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "IPASDCTL_CACHE_DIR": str(tmp_path),
               "_IPASDCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return subprocess.run([str(script)], capture_output=True, text=True, env=env).stdout.split()

    assert complete("ipasdctl ev") == ["eval"]
    assert complete("ipasdctl bench --batch") == ["--batch-sizes"]


def test_every_command_takes_quiet():
    import typer

    from ipasdctl.cli import app

    commands = typer.main.get_command(app).commands
    assert set(commands) == {"train", "list", "compare", "eval", "report", "export", "bench", "calibrate", "predict",
                             "tune", "prune"}
    for name, command in commands.items():
        quiet = [p for p in command.params if p.name == "quiet"]
        assert quiet and set(quiet[0].opts) == {"--quiet", "-q"}, name


def test_the_lazy_api_names_are_the_api_modules():
    """`import ipasdctl` lists the API without importing it (ipasdctl._API); api.__all__ is what it forwards to:
    the two lists must not drift apart, and every name must resolve."""
    import ipasdctl
    from ipasdctl import api

    assert sorted(ipasdctl.__all__) == sorted(api.__all__)
    assert all(getattr(ipasdctl, name) is getattr(api, name) for name in ipasdctl.__all__)
