"""Seed-to-seed statistics of a comparison: a t-interval per method, and a paired t-test against a reference.

- Per method, over its n seeds: mean, sample standard deviation s (n - 1) and the 95 % t-interval
  mean ± t_{0.975, n-1} · s / sqrt(n) (Student's t: the seeds are few and their spread is estimated).
- Against the reference (ce), over the seeds both have: runs with the same seed share their data order,
  augmentation and initial weights, so the paired differences d_i = x_i - ref_i remove what the seed does to
  both. Their mean, its 95 % interval mean(d) ± t_{0.975, n-1} · s_d / sqrt(n), and the two-sided paired
  t-test p = 2 · P(T_{n-1} > |mean(d)| / (s_d / sqrt(n))). The interval excludes 0 exactly when p < 0.05.
- Verdict: "better" / "worse" when p < 0.05 (by the sign of the mean difference), else "no clear
  difference"; with fewer than 3 paired seeds it is "needs more seeds" (two seeds give one degree of freedom:
  the interval is 12.7 standard errors wide either way, and one unlucky seed decides the test).
When all differences are equal (s_d = 0) the test is degenerate: p = 1 for a zero difference, else 0.
- An accuracy's interval (`accuracy_interval`) is left out below 3 seeds (with one degree of freedom it spans
  12.7 standard errors either way: [-5.45, 125.51] for a 2-seed top-1 of 60 +- 5) and clipped to 0-100 %
  from 3 seeds on: an accuracy cannot leave that range, whatever the t-distribution allows. `ACCURACY_CI_NOTE`
  says so in the tables.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
MIN_SEEDS = 3
NEEDS_MORE_SEEDS = "needs more seeds"


def _t_quantile(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, dof))


def t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, low, high) of the 95 % t-interval of the mean; std and bounds NaN for one value."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = _t_quantile(n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


ACCURACY_RANGE = (0.0, 100.0)  # per cent
ACCURACY_CI_NOTE = (f"the 95 % t-interval of the mean over seeds, clipped to 0-100 %; left out (—) below "
                    f"{MIN_SEEDS} seeds, where one degree of freedom makes it 12.7 standard errors wide either way")


def accuracy_interval(values: Sequence[float], bounds: tuple[float, float] = ACCURACY_RANGE
                      ) -> tuple[float, float, float, float]:
    """t_interval of accuracies in per cent: bounds NaN below MIN_SEEDS values, else clipped to `bounds`."""
    mean, std, low, high = t_interval(values)
    if np.asarray(values).size < MIN_SEEDS:
        return mean, std, math.nan, math.nan
    return mean, std, max(low, bounds[0]), min(high, bounds[1])


def paired_test(values: Sequence[float], reference: Sequence[float]) -> dict:
    """Paired comparison of `values` with `reference` (the same seeds, in the same order): n, mean difference,
    its 95 % t-interval, the two-sided paired t-test's p-value and the verdict (see the module docstring)."""
    from scipy import stats

    d = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    n = d.size
    mean, std, low, high = t_interval(d)
    if n < 2:
        p = math.nan
    elif std == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (std / math.sqrt(n))
        p = float(2 * stats.t.sf(abs(t), n - 1))
    return {"pairs": int(n), "mean": mean, "low": low, "high": high, "p": p, "verdict": verdict(n, mean, p)}


def verdict(pairs: int, mean_difference: float, p: float) -> str:
    if pairs < MIN_SEEDS:
        return NEEDS_MORE_SEEDS
    if p < 1 - CONFIDENCE:
        return "better" if mean_difference > 0 else "worse"
    return "no clear difference"
