"""A method's `changes_images` declaration reaches the tables: the run's summary, results.csv, summary.csv and
summary.md (a mark and its note), and the selection table."""

from __future__ import annotations

import pandas as pd

from ipasdctl.analysis.selection import selection_table
from ipasdctl.config import load_recipe
from ipasdctl.methods import METHODS
from ipasdctl.runs import RESULT_COLUMNS
from ipasdctl.studies import plan as planning
from ipasdctl.studies.summary import CHANGES_IMAGES_MARK, results_table, summary_markdown, summary_table


def test_the_methods_that_change_the_training_images_say_so():
    marked = {name for name in METHODS.names() if METHODS.get(name).changes_images}
    assert marked == {"ddgsd", "mixskd", "mixup"}


def hand_results(with_column=True):
    table = pd.DataFrame({"method": ["ce", "mixskd", "maxsup", "ce", "mixskd", "maxsup"],
                          "seed": [0, 0, 0, 1, 1, 1],
                          "best_top1": [70.0, 72.0, 71.0, 71.0, 73.5, 70.5],
                          "last_top1": [69.0, 71.0, 70.0, 70.0, 72.5, 70.0],
                          "train_seconds": [1.0] * 6})
    if with_column:
        table["changes_images"] = [False, True, False, False, True, False]
    return table


def test_summary_marks_the_methods_that_change_the_images(tmp_path):
    summary = summary_table(hand_results()).set_index("method")
    assert summary["changes_images"].to_dict() == {"ce": False, "mixskd": True, "maxsup": False}
    assert not summary_table(hand_results(with_column=False))["changes_images"].any()  # an older results.csv

    plan = planning.plan(load_recipe("demo", {"method": {"name": "mixskd"}, "train": {"epochs": 1}}), "maxsup",
                         [0, 1], tmp_path / "c")
    text = summary_markdown(plan, summary_table(hand_results()))
    rows = {name: next(line for line in text.splitlines() if line.startswith("| ") and f"`{name}`" in line)
            for name in ("ce", "mixskd", "maxsup")}
    assert f"`mixskd`{CHANGES_IMAGES_MARK} |" in rows["mixskd"]
    assert CHANGES_IMAGES_MARK not in rows["ce"] and CHANGES_IMAGES_MARK not in rows["maxsup"]
    note = next(line for line in text.splitlines() if line.startswith(f"- {CHANGES_IMAGES_MARK}"))
    assert "`mixskd`" in note and "`maxsup`" not in note and "--baselines mixup" in note
    plain = summary_markdown(plan, summary_table(hand_results(with_column=False)))
    assert CHANGES_IMAGES_MARK not in plain


def test_results_and_selection_carry_the_mark(tmp_path):
    plan = planning.plan(load_recipe("demo", {"method": {"name": "mixup"}, "train": {"epochs": 1}}), "", [0],
                         tmp_path / "c")
    assert "changes_images" in RESULT_COLUMNS
    pending = results_table(plan).set_index("method")
    assert pending["changes_images"].to_dict() == {"ce": False, "mixup": True}  # from the registry, before training

    folder = tmp_path / "cmp"
    folder.mkdir()
    rows = []
    for method, mark, top1 in [("ce", False, 70.0), ("mixup", True, 72.0)]:
        (folder / f"{method}-s0").mkdir()
        rows.append({"method": method, "seed": 0, "arch": "resnet8", "dataset": "digits", "epochs": 1,
                     "changes_images": mark, "best_top1": top1, "last_top1": top1, "run_dir": f"{method}-s0"})
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    table = selection_table([folder], None, None).set_index("method")
    assert table["changes_images"].to_dict() == {"ce": False, "mixup": True}
