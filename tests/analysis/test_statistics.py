"""The statistics of compare summaries against hand computations on fixed numbers.

Student's t with 2 degrees of freedom has a closed form, so the figures below are exact by hand:
CDF F(t) = 1/2 + t / (2 sqrt(2 + t^2)); its 0.975 quantile solves t / sqrt(2 + t^2) = 0.95, t^2 = 1.805 / 0.0975.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ipasdctl.analysis.statistics import paired_test, t_interval
from ipasdctl.config import load_recipe
from ipasdctl.studies import plan as planning
from ipasdctl.studies.summary import SUMMARY_COLUMNS, summary_markdown, summary_table

T975_DOF2 = math.sqrt(1.805 / 0.0975)  # 4.302652...


def two_sided_p_dof2(t: float) -> float:
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_t_interval_by_hand():
    mean, std, low, high = t_interval([70.0, 72.0, 74.0])
    assert (mean, std) == (72.0, 2.0)  # s^2 = (4 + 0 + 4) / 2
    half = T975_DOF2 * 2.0 / math.sqrt(3)
    assert (low, high) == (pytest.approx(72 - half, abs=1e-9), pytest.approx(72 + half, abs=1e-9))
    one = t_interval([70.0])
    assert one[0] == 70.0 and all(math.isnan(v) for v in one[1:])


def test_paired_test_by_hand():
    # differences 1, 2, 1: mean 4/3, s_d = sqrt(1/3), standard error 1/3, t = 4
    result = paired_test([71.0, 74.0, 75.0], [70.0, 72.0, 74.0])
    assert result["pairs"] == 3 and result["mean"] == pytest.approx(4 / 3)
    assert result["low"] == pytest.approx(4 / 3 - T975_DOF2 / 3, abs=1e-9)
    assert result["high"] == pytest.approx(4 / 3 + T975_DOF2 / 3, abs=1e-9)
    assert result["p"] == pytest.approx(two_sided_p_dof2(4.0), abs=1e-9)  # 0.0572: not below 0.05
    assert result["verdict"] == "no clear difference"
    # differences -2, -3, -2.5: mean -2.5, s_d = 0.5, t = -2.5 / (0.5 / sqrt 3) = -5 sqrt 3
    worse = paired_test([68.0, 69.0, 71.5], [70.0, 72.0, 74.0])
    assert worse["p"] == pytest.approx(two_sided_p_dof2(-5 * math.sqrt(3)), abs=1e-9)
    assert worse["high"] < 0 and worse["verdict"] == "worse"
    assert paired_test([72.0, 75.0, 77.5], [70.0, 72.0, 74.0])["verdict"] == "better"


def test_fewer_than_three_seeds_need_more_seeds_and_equal_differences_are_degenerate():
    two = paired_test([80.0, 81.0], [70.0, 72.0])
    assert two["pairs"] == 2 and two["verdict"] == "needs more seeds" and two["p"] < 0.1
    assert paired_test([71.0, 72.0, 73.0], [70.0, 71.0, 72.0])["p"] == 0.0  # always +1: s_d = 0
    same = paired_test([70.0, 71.0, 72.0], [70.0, 71.0, 72.0])
    assert (same["p"], same["verdict"]) == (1.0, "no clear difference")


def hand_results():
    return pd.DataFrame({
        "method": ["ce", "ipasd", "ce", "ipasd", "ce", "ipasd", "ls"],
        "seed": [0, 0, 1, 1, 2, 2, 0],
        "best_top1": [70.0, 68.0, 72.0, 69.0, 74.0, 71.5, 90.0],
        "last_top1": [70.0, 71.0, 72.0, 74.0, 74.0, 75.0, 60.0],
        "train_seconds": [1.0] * 7,
    })


def test_summary_table_columns_pair_by_seed():
    table = summary_table(hand_results()).set_index("method")
    assert list(summary_table(hand_results()).columns) == SUMMARY_COLUMNS
    ipasd = table.loc["ipasd"]
    assert ipasd["paired_seeds"] == 3
    assert ipasd["paired_delta_last_top1_mean"] == pytest.approx(4 / 3)
    assert ipasd["paired_delta_last_top1_p"] == pytest.approx(two_sided_p_dof2(4.0), abs=1e-9)
    assert ipasd["verdict_last_top1"] == "no clear difference"
    assert ipasd["paired_delta_best_top1_mean"] == pytest.approx(-2.5)
    assert ipasd["verdict_best_top1"] == "worse"
    assert ipasd["last_top1_ci_low"] == pytest.approx(t_interval([71.0, 74.0, 75.0])[2])
    assert table.loc["ls", "paired_seeds"] == 1 and table.loc["ls", "verdict_last_top1"] == "needs more seeds"
    assert table.loc["ce", "verdict_last_top1"] == "(reference)"
    assert set(table["best_chosen_on"]) == {"test"}


def test_summary_markdown_shows_intervals_p_values_verdicts_and_the_seed_note(tmp_path):
    recipe = load_recipe("demo", {"train": {"epochs": 1}})
    plan = planning.plan(recipe, "ls", [0, 1, 2], tmp_path / "c")
    text = summary_markdown(plan, summary_table(hand_results()))
    ipasd_row = next(line for line in text.splitlines() if "`ipasd`" in line)
    assert "+1.33 [-0.10, +2.77]" in ipasd_row and "0.057" in ipasd_row and "no clear difference" in ipasd_row
    assert "-2.50 [" in ipasd_row and "worse" in ipasd_row
    ls_row = next(line for line in text.splitlines() if "`ls`" in line)
    assert "needs more seeds" in ls_row
    assert "**The verdicts need more seeds**: this comparison has 1 paired seed" in text
    assert "optimistic" in text  # no validation split: the best epoch was chosen on the test set


def test_accuracy_intervals_stay_within_0_to_100_and_are_left_out_below_three_seeds(tmp_path):
    from ipasdctl.analysis.statistics import accuracy_interval

    # two seeds: the t-interval runs far outside the range (12.7 standard errors either way): left out
    assert t_interval([55.0, 65.0])[2] < 0 and t_interval([55.0, 65.0])[3] > 100
    mean, std, low, high = accuracy_interval([55.0, 65.0])
    assert (mean, std) == (60.0, pytest.approx(math.sqrt(50.0))) and math.isnan(low) and math.isnan(high)
    # three seeds near the top: the upper bound is clipped to 100 %, the lower one is the t-interval's
    raw = t_interval([98.0, 99.5, 100.0])
    assert raw[3] > 100
    clipped = accuracy_interval([98.0, 99.5, 100.0])
    assert clipped[2] == pytest.approx(raw[2]) and clipped[3] == 100.0
    assert accuracy_interval([2.0, 0.5, 0.0])[2] == 0.0

    results = pd.DataFrame({"method": ["ce", "ce", "ce", "ipasd", "ipasd"], "seed": [0, 1, 2, 0, 1],
                            "best_top1": [98.0, 99.5, 100.0, 55.0, 65.0], "last_top1": [98.0, 99.5, 100.0, 55.0, 65.0],
                            "train_seconds": [1.0] * 5})
    table = summary_table(results).set_index("method")
    assert table.loc["ce", "last_top1_ci_high"] == 100.0 and math.isnan(table.loc["ipasd", "last_top1_ci_low"])
    recipe = load_recipe("demo", {"train": {"epochs": 1}})
    text = summary_markdown(planning.plan(recipe, "", [0, 1, 2], tmp_path / "c"), summary_table(results))
    ce_row = next(line for line in text.splitlines() if "`ce`" in line)
    ipasd_row = next(line for line in text.splitlines() if "`ipasd`" in line)
    assert f"[{raw[2]:.2f}, 100.00]" in ce_row
    assert ipasd_row.split(" | ")[4] == "—"  # the 95 % CI column: left out for two seeds
    assert "clipped to 0-100 %; left out (—) below 3 seeds" in text
