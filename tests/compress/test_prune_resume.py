"""A prune killed during its recovery (SIGKILL, then SIGTERM) and run again ends bitwise where the uninterrupted
prune ends: the pruned run folder resumes exactly, as any run folder (tests/training/test_resume.py's pattern:
real processes, the engine's IPASDCTL_TEST_SIGNAL_AT_STEP hook, one thread each)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ipasdctl.runs import RunFolder
from tests.helpers import metrics_without_timings as metrics
from tests.helpers import start_cli as start

pytestmark = pytest.mark.slow  # real processes, killed and resumed: tens of seconds

def command(source: Path, out: Path, name: str) -> list[str]:
    """2 recovery epochs of 4 steps (64 digits, batch 16), a checkpoint every 2 steps."""
    return ["prune", str(source), "--target-macs", "0.5", "--epochs", "2", "--out", str(out), "--name", name, "-q",
            "--set", "train.batch_size=16", "--set", "checkpoint.every_steps=2", "--device", "cpu"]



def outcome(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr



@pytest.fixture(scope="module")
def runs(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune_resume")
    reference, killed = start(command(demo_run, out, "reference")), start(command(demo_run, out, "killed"), "3")
    log = {"reference": outcome(reference), "kill": outcome(killed)}
    checkpoint = torch.load(RunFolder(out / "killed").last, weights_only=True)
    log["term"] = outcome(start(command(demo_run, out, "killed"), "6:TERM"))
    log["resume"] = outcome(start([a for a in command(demo_run, out, "killed") if a != "-q"]))  # with its notes
    return {"out": out, "log": log, "kill_checkpoint": checkpoint}


def test_the_killed_prune_resumes_and_ends_as_the_uninterrupted_one(runs):
    log, out = runs["log"], runs["out"]
    assert log["reference"][0] == 0 and log["resume"][0] == 0, (log["reference"][2], log["resume"][2])
    assert log["kill"][0] == -signal.SIGKILL
    state = runs["kill_checkpoint"]  # the mid-epoch checkpoint after global step 2 (the killed step 3 is redone)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    code, _, err = log["term"]
    assert code == 143 and err.strip().splitlines()[-1] == (
        f"interrupted: checkpoint written in {out / 'killed'}; run the same `ipasdctl prune` again to continue")
    assert f"{out / 'killed'}: pruned with these settings but unfinished; continuing it" in log["resume"][2]
    reference, resumed = RunFolder(out / "reference"), RunFolder(out / "killed")
    assert metrics(resumed.path) == metrics(reference.path) and len(metrics(reference.path)) == 2
    for which in ("best", "last"):
        a, b = (torch.load(run.checkpoint(which), weights_only=True) for run in (reference, resumed))
        assert set(a["model"]) == set(b["model"])
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), which  # bitwise on CPU
        assert all(torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
                   for k in a["optimizer"]["state"])
    assert reference.read_config()["model"]["structure"] == resumed.read_config()["model"]["structure"]
    records = [json.loads(run.pruning.read_text()) for run in (reference, resumed)]
    assert records[0]["finished"] and records[1]["finished"]
    assert [s["macs"] for s in records[0]["steps"]] == [s["macs"] for s in records[1]["steps"]]
    assert not (resumed.path / ".prune-lock").exists() and not (resumed.path / ".lock").exists()
