"""Fuzz: mutated recipes (deep nesting and duplicate keys among the mutations), checkpoints (zip records
that inflate far beyond the file among them), ONNX metadata, CIFAR pickles and CSV tables with formula cells,
seeded, fed to the loaders (the CSV tables to the writer, then back to a reader).

Every case ends in success or a one-line UserError (what the CLI prints as `error: ...` with exit 2), never
another exception, within CASE_SECONDS; the driver (fuzz_loaders.py beside it) runs in a process of its own
under an address-space limit (2 GiB beyond its imports: a loader that tries to allocate 100 GB fails the
case with MemoryError) and a CPU-time limit, and the whole run under a wall-clock timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ipasdctl

CASES_PER_KIND = 100  # 500 cases: ~20 s on a loaded 2-core machine, most of it the imports
SEED = 19


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets Linux resource limits")
def test_mutated_inputs_end_in_success_or_one_line(tmp_path):
    driver = Path(__file__).with_name("fuzz_loaders.py")
    env = {**os.environ, "PYTHONPATH": str(Path(ipasdctl.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(driver), str(SEED), str(CASES_PER_KIND), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failures = [line for line in lines if "summary" not in line]
    assert done.returncode == 0 and lines and "summary" in lines[-1], done.stderr[-3000:]
    assert failures == []
    for kind, counts in lines[-1]["summary"].items():  # the mutations reach both ends: some load, most are refused
        assert counts["ok"] > 0 and counts["user_error"] > 0 and sum(counts.values()) == CASES_PER_KIND, (kind, counts)
