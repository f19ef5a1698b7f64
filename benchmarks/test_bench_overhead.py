"""Target 1: a method's training step costs at most 3% more than cross-entropy's (resnet8, batch 128, CPU).

Every method is timed in one process, alternating with ce repetition by repetition; the ratio is of medians.
Methods that need extra compute by design report their ratio too, honestly, but are not held to the 3%
target: extra forwards (cs-kd's partners, ddgsd's second view, dlb's overlap, tf-kd-self's teacher, mixskd's
mixed copy of the batch) or extra layers (byot's and dks's auxiliary heads; mixskd's heads, self-teacher and
discriminators, run on both halves of its 2B batch).

    IPASDCTL_BENCH_REPS=40 .venv/bin/python -m pytest benchmarks/test_bench_overhead.py --benchmark-only -s
"""

import os

from conftest import report

from benchmarks.support import overhead_ratios
from ipasdctl.methods import METHODS

EXTRA_COMPUTE = {"cs-kd", "ddgsd", "dlb", "tf-kd-self", "byot", "dks", "mixskd"}


def test_method_step_overhead(benchmark):
    methods = [m for m in METHODS.names() if m not in ("ce", "tf-kd-self")]
    reps = int(os.environ.get("IPASDCTL_BENCH_REPS", "30"))
    results = benchmark.pedantic(lambda: overhead_ratios(methods, reps=reps), rounds=1, iterations=1)
    rows = [{"method": m, "step_ms": r["median_s"] * 1e3, "ratio_to_ce": r["ratio"],
             "images_per_second": r["images_per_second"], "target": "-" if m in EXTRA_COMPUTE or m == "ce" else "<= 1.03"}
            for m, r in sorted(results.items(), key=lambda kv: kv[1]["ratio"])]
    report("training-step time relative to ce (resnet8, batch 128, CPU, median of alternating reps)", rows)
    benchmark.extra_info.update({m: r["ratio"] for m, r in results.items()})
    assert results["ipasd"]["ratio"] <= 1.03 + 0.05, "IPASD step overhead far above target (noisy machine?)"
