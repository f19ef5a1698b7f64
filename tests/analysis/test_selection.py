"""Model selection on hand-made results.csv, export jsons and latency.csv: means over seeds, the join of
exports to runs by run_dir, the Pareto set (accuracy up, latency down, per data set) and the best model under
a latency budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from ipasdctl.errors import UserError
from ipasdctl.analysis.selection import best_under_budget, pareto_mask, selection_table, write_selection

RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "best_top1", "last_top1", "best_epoch", "best_top5",
                  "params", "macs", "train_seconds", "images_per_second", "run_dir"]

# (method, arch, dataset, seed, best_top1, params, macs)
RUNS = [
    ("ce", "resnet8", "cifar10", 0, 70.0, 78_000, 12_000_000),
    ("ce", "resnet8", "cifar10", 1, 72.0, 78_000, 12_000_000),
    ("ipasd", "resnet8", "cifar10", 0, 75.0, 78_000, 12_000_000),
    ("ipasd", "resnet8", "cifar10", 1, 77.0, 78_000, 12_000_000),
    ("ipasd", "resnet20", "cifar10", 0, 80.0, 270_000, 41_000_000),
    ("ipasd", "resnet56", "cifar10", 0, 79.0, 850_000, 125_000_000),
    ("cs_kd", "resnet20", "cifar10", 0, 80.0, 270_000, 41_000_000),
    ("ps_kd", "resnet32", "cifar10", 0, 90.0, 460_000, 69_000_000),  # never exported: no latency
    ("ipasd", "resnet110", "cifar100", 0, 50.0, 1_700_000, 250_000_000),
]

# export name -> (run name, precision, p50 latency at batch 1, file size, own onnxruntime top-1)
EXPORTS = {
    "ce-r8-s0": ("ce-resnet8-s0", "fp32", 1.0, 300_000, 70.0),
    "ce-r8-s1": ("ce-resnet8-s1", "fp32", 1.0, 300_000, 72.0),
    "ipasd-r8-s0": ("ipasd-resnet8-s0", "fp32", 0.9, 300_000, 75.0),
    "ipasd-r8-s1": ("ipasd-resnet8-s1", "fp32", 1.1, 300_000, 77.0),
    "ipasd-r8-s0-int8": ("ipasd-resnet8-s0", "int8", 0.5, 90_000, 75.0),
    "ipasd-r8-s1-int8": ("ipasd-resnet8-s1", "int8", 0.5, 90_000, 76.0),
    "ipasd-r20-s0": ("ipasd-resnet20-s0", "fp32", 3.0, 1_000_000, 80.0),
    "ipasd-r56-s0": ("ipasd-resnet56-s0", "fp32", 5.0, 3_300_000, 79.0),
    "cs_kd-r20-s0": ("cs_kd-resnet20-s0", "fp32", 3.0, 1_000_000, 80.0),
    "ipasd-r110-s0": ("ipasd-resnet110-s0", "fp32", 10.0, 6_800_000, 50.0),
}


def run_name(method, arch, seed):
    return f"{method}-{arch}-s{seed}"


@pytest.fixture
def workspace(tmp_path) -> dict:
    comparisons = [tmp_path / "cmp-cifar10", tmp_path / "cmp-cifar100"]
    for folder in comparisons:
        folder.mkdir()
    rows = {c: [] for c in comparisons}
    for method, arch, dataset, seed, top1, params, macs in RUNS:
        folder = comparisons[0] if dataset == "cifar10" else comparisons[1]
        name = run_name(method, arch, seed)
        (folder / name).mkdir()
        # run_dir relative to the comparison folder in one table, absolute in the other
        run_dir = name if dataset == "cifar10" else str(folder / name)
        rows[folder].append({"method": method, "seed": seed, "arch": arch, "dataset": dataset, "epochs": 200,
                             "best_top1": top1, "last_top1": top1 - 1, "best_epoch": 190, "best_top5": top1 + 15,
                             "params": params, "macs": macs, "train_seconds": 100.0, "images_per_second": 500.0,
                             "run_dir": run_dir})
    for folder, table in rows.items():
        pd.DataFrame(table, columns=RESULT_COLUMNS).to_csv(folder / "results.csv", index=False)

    exports = tmp_path / "exports"
    exports.mkdir()
    latency = []
    for name, (run, precision, p50, size, own_top1) in EXPORTS.items():
        dataset_folder = comparisons[1] if "r110" in name else comparisons[0]
        record = {"format": "ipasdctl-export-1", "name": name, "onnx_file": f"{name}.onnx", "precision": precision,
                  "run_dir": str(dataset_folder / run), "file_size_bytes": size}
        record["onnx_test"] = {"top1": own_top1, "top5": own_top1 + 15, "n": 10000}
        (exports / f"{name}.json").write_text(json.dumps(record))
        (exports / f"{name}.onnx").write_bytes(b"\0" * 8)
        for backend, provider, batch, value in (("onnxruntime", "CPUExecutionProvider", 1, p50),
                                                ("onnxruntime", "CPUExecutionProvider", 8, 8 * p50),
                                                ("pytorch", "cpu", 1, 0.01)):  # decoys: must not be used
            latency.append({"model": f"{name}.onnx", "precision": precision, "backend": backend, "provider": provider,
                            "batch_size": batch, "threads": 4, "p50_ms": value, "p90_ms": value * 1.2,
                            "p99_ms": value * 1.5, "mean_ms": value, "throughput_ips": batch * 1000 / value,
                            "cpu_model": "Test CPU", "model_path": str(exports / f"{name}.onnx")})
    pd.DataFrame(latency).to_csv(exports / "latency.csv", index=False)
    (exports / "unrelated.json").write_text(json.dumps({"something": "else"}))
    # an export in progress stages its files in a hidden folder: not counted until renamed into place
    staging = exports / ".ce-r8-s0.abc123.tmp"
    staging.mkdir()
    (staging / "ce-r8-s0.json").write_text(json.dumps({"onnx_file": "ce-r8-s0.onnx", "precision": "int8",
                                                       "run_dir": str(comparisons[0] / "ce-resnet8-s0")}))
    return {"comparisons": comparisons, "exports": exports}


def row(table, method, arch, precision="fp32"):
    found = table[(table["method"] == method) & (table["arch"] == arch) & (table["precision"] == precision)]
    assert len(found) == 1, (method, arch, precision, len(found))
    return found.iloc[0]


def test_accuracy_is_the_mean_over_seeds_and_exports_join_by_run_dir(workspace):
    table = selection_table(workspace["comparisons"], workspace["exports"], None)
    ce = row(table, "ce", "resnet8")
    assert ce["top1"] == pytest.approx(71.0) and ce["seeds"] == 2
    assert ce["top1_std"] == pytest.approx(math.sqrt(((70 - 71) ** 2 + (72 - 71) ** 2) / 1))
    assert ce["top5"] == pytest.approx(86.0) and ce["pytorch_last_top1"] == pytest.approx(70.0)
    assert ce["accuracy_source"].startswith("onnxruntime fp32") and ce["seeds_compared"] == 2
    assert ce["params"] == 78_000 and ce["macs"] == 12_000_000
    ipasd8 = row(table, "ipasd", "resnet8")
    assert ipasd8["latency_ms"] == pytest.approx((0.9 + 1.1) / 2)  # mean over the seeds' exports, batch 1, ORT CPU
    assert ipasd8["latency_p99_ms"] == pytest.approx(1.5)
    assert ipasd8["file_size_mb"] == pytest.approx(0.3)
    assert set(ipasd8["exports"].split(";")) == {"ipasd-r8-s0.onnx", "ipasd-r8-s1.onnx"}
    int8 = row(table, "ipasd", "resnet8", "int8")
    assert int8["top1"] == pytest.approx(75.5) and int8["latency_ms"] == pytest.approx(0.5) and int8["seeds"] == 2
    assert int8["seeds_compared"] == 2 and not int8["slower_than_fp32"] and int8["missing_seeds"] == ""
    assert int8["top1_by_seed"] == "0:75;1:76"
    assert int8["file_size_mb"] == pytest.approx(0.09)
    never_exported = row(table, "ps_kd", "resnet32")
    assert math.isnan(never_exported["latency_ms"]) and never_exported["exports"] == ""
    assert len(table) == 8  # 7 (dataset, method, arch, epochs) groups + one int8 variant


def test_pareto_set_per_dataset(workspace):
    table = selection_table(workspace["comparisons"], workspace["exports"], None)
    optimal = {(r.method, r.arch, r.precision) for r in table.itertuples() if r.pareto_optimal}
    assert optimal == {
        ("ipasd", "resnet8", "fp32"),   # 76 % at 1.0 ms: nothing as accurate is as fast
        ("ipasd", "resnet8", "int8"),   # 75.5 % at 0.5 ms: the fastest
        ("ipasd", "resnet20", "fp32"),  # 80 % at 3.0 ms, tied exactly with cs_kd/resnet20: neither dominates
        ("cs_kd", "resnet20", "fp32"),
        ("ipasd", "resnet110", "fp32"),  # the only cifar100 row; cifar10 rows do not compete with it
    }
    # ce/resnet8 (71 % at 1.0 ms) is dominated by ipasd/resnet8 (76 % at 1.0 ms): equal speed, more accurate;
    # resnet56 (79 % at 5 ms) by resnet20 (80 % at 3 ms); ps_kd/resnet32 has no latency and is not judged


def test_pareto_mask_against_brute_force_definition():
    accuracy = [1.0, 2.0, 2.0, 3.0, 3.0, float("nan"), 0.5]
    latency = [1.0, 1.0, 2.0, 3.0, 3.0, 0.1, 0.5]
    mask = pareto_mask(accuracy, latency)
    expected = []
    for i in range(len(accuracy)):
        if math.isnan(accuracy[i]) or math.isnan(latency[i]):
            expected.append(False)
            continue
        dominated = any(j != i and not math.isnan(accuracy[j]) and accuracy[j] >= accuracy[i] and latency[j] <= latency[i]
                        and (accuracy[j] > accuracy[i] or latency[j] < latency[i]) for j in range(len(accuracy)))
        expected.append(not dominated)
    assert list(mask) == expected == [False, True, False, True, True, False, True]


@pytest.mark.parametrize("budget,expected", [
    (0.7, ("ipasd", "resnet8", "int8")),
    (2.0, ("ipasd", "resnet8", "fp32")),  # 76 % beats int8's 75.5 % once 1.0 ms is allowed
    (4.0, ("resnet20", 80.0)),           # the two tied resnet20 rows: 80 % at 3 ms
    (100.0, ("resnet20", 80.0)),         # ps_kd/resnet32's 90 % has no latency: it never qualifies
])
def test_best_under_budget(workspace, budget, expected):
    table = selection_table(workspace["comparisons"], workspace["exports"], budget)
    best = best_under_budget(table, budget)
    cifar10 = best[best["dataset"] == "cifar10"]
    assert len(cifar10) == 1
    pick = cifar10.iloc[0]
    if len(expected) == 3:
        assert (pick["method"], pick["arch"], pick["precision"]) == expected
    else:
        assert pick["arch"] == expected[0] and pick["top1"] == pytest.approx(expected[1])
        assert pick["latency_ms"] == pytest.approx(3.0)
    assert pick["latency_ms"] <= budget
    assert table.loc[table["within_budget"], "latency_ms"].max() <= budget
    assert (~table["within_budget"] | table["latency_ms"].notna()).all()
    has_cifar100 = "cifar100" in set(best["dataset"])
    assert has_cifar100 == (budget >= 10.0)


def test_nothing_under_a_tiny_budget(workspace):
    table = selection_table(workspace["comparisons"], workspace["exports"], None)
    assert best_under_budget(table, 0.1).empty
    with pytest.raises(UserError):
        best_under_budget(table, 0)


def test_without_exports_no_latency_and_no_pareto(workspace):
    table = selection_table(workspace["comparisons"], None, None)
    assert len(table) == 7 and set(table["precision"]) == {"fp32"}
    assert table["latency_ms"].isna().all() and not table["pareto_optimal"].any()
    assert row(table, "ipasd", "resnet8")["top1"] == pytest.approx(76.0)


def test_write_selection_round_trips(workspace, tmp_path):
    table = selection_table(workspace["comparisons"], workspace["exports"], 2.0)
    path = write_selection(table, tmp_path / "report" / "selection.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(table.columns)
    assert list(back["pareto_optimal"]) == list(table["pareto_optimal"])
    assert back["top1"].tolist() == pytest.approx(table["top1"].tolist())


def test_bad_inputs(workspace, tmp_path):
    with pytest.raises(UserError, match="no results.csv"):
        selection_table([tmp_path / "nowhere"], None, None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.csv").write_text("method,seed\nce,0\n")
    with pytest.raises(UserError, match="lacks the columns"):
        selection_table([broken], None, None)
    with pytest.raises(UserError, match="exports folder"):
        selection_table(workspace["comparisons"], tmp_path / "no-exports", None)
    with pytest.raises(UserError, match="budget"):
        selection_table(workspace["comparisons"], None, -1.0)


def test_like_with_like_recommends_the_fast_fp32_where_the_old_table_picked_a_slower_int8(tmp_path, capsys):
    """The case a user met: the old table set PyTorch's best-epoch top-1 of every seed (fp32 rows) beside one
    exported seed's onnxruntime top-1 (int8 row), and under 2 ms recommended the int8 model although the fp32
    export of the same model ran faster. Now both rows are onnxruntime top-1 over their own seeds, the slower
    int8 is flagged and never recommended, and an export of no compared run is named."""
    from ipasdctl.analysis.report import selection_section

    comparison = tmp_path / "cmp"
    comparison.mkdir()
    rows = []
    for seed, best in ((0, 91.0), (1, 91.4)):
        (comparison / f"cs-kd-s{seed}").mkdir()
        rows.append({"method": "cs-kd", "seed": seed, "arch": "resnet8", "dataset": "cifar10", "epochs": 30,
                     "best_top1": best, "last_top1": best - 0.5, "best_epoch": 29, "best_top5": 99.0,
                     "params": 78_000, "macs": 12_000_000, "train_seconds": 1.0, "images_per_second": 1.0,
                     "run_dir": f"cs-kd-s{seed}"})
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(comparison / "results.csv", index=False)
    exports = tmp_path / "exports"
    exports.mkdir()
    latency = []
    # (name, seed, precision, onnxruntime top-1, p50 ms); the int8 model: one seed, more accurate, but slower
    for name, seed, precision, top1, p50 in (("s0", 0, "fp32", 91.90, 0.228), ("s1", 1, "fp32", 92.00, 0.228),
                                             ("s0-int8", 0, "int8", 92.10, 0.3947), ("stray", 7, "fp32", 99.0, 0.1)):
        run = comparison / f"cs-kd-s{seed}" if name != "stray" else tmp_path / "elsewhere"
        (exports / f"{name}.json").write_text(json.dumps({
            "onnx_file": f"{name}.onnx", "precision": precision, "run_dir": str(run), "checkpoint": "best",
            "file_size_bytes": 1000, "onnx_test": {"top1": top1, "top5": 99.0, "n": 10000}}))
        (exports / f"{name}.onnx").write_bytes(b"\0")
        latency.append({"model": f"{name}.onnx", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                        "batch_size": 1, "threads": 2, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50,
                        "throughput_ips": 1000 / p50, "cpu_model": "Test CPU", "model_path": str(exports / f"{name}.onnx")})
    pd.DataFrame(latency).to_csv(exports / "latency.csv", index=False)

    table = selection_table([comparison], exports, 2.0)
    fp32, int8 = row(table, "cs-kd", "resnet8"), row(table, "cs-kd", "resnet8", "int8")
    assert fp32["top1"] == pytest.approx(91.95) and fp32["seeds"] == 2 and fp32["seeds_compared"] == 2
    assert int8["top1"] == pytest.approx(92.10) and int8["seeds"] == 1 and int8["slower_than_fp32"]
    assert fp32["pytorch_best_top1"] == pytest.approx(91.2)  # what the old table put in the fp32 row
    pick = best_under_budget(table, 2.0).iloc[0]
    assert pick["precision"] == "fp32" and pick["latency_ms"] == pytest.approx(0.228)
    assert table.attrs["unmatched_exports"] == ["stray.onnx"]

    lines = "\n".join(selection_section([comparison], exports, 2.0, tmp_path))
    assert "cs-kd / resnet8 (fp32)" in lines and "over 2 seed(s)" in lines
    assert "int8 is slower than its fp32 export" in lines and "stray.onnx" in lines
    assert "stray.onnx" in capsys.readouterr().err


def _comparison_with_exports(tmp_path: Path, runs: dict, p50: float = 1.5) -> tuple[Path, Path]:
    """A comparison of `runs` {method: {seed: (pytorch best top-1, onnxruntime top-1 or None: not exported)}}, and
    an exports folder with the exported ones (fp32, all at `p50` ms)."""
    comparison, exports = tmp_path / "cmp", tmp_path / "exports"
    comparison.mkdir()
    exports.mkdir()
    rows, latency = [], []
    for method, seeds in runs.items():
        for seed, (best, exported) in seeds.items():
            name = f"{method}-s{seed}"
            (comparison / name).mkdir()
            rows.append({"method": method, "seed": seed, "arch": "resnet8", "dataset": "cifar10", "epochs": 30,
                         "best_top1": best, "last_top1": best, "best_epoch": 29, "best_top5": 90.0, "params": 78_000,
                         "macs": 12_000_000, "train_seconds": 1.0, "images_per_second": 1.0, "run_dir": name})
            if exported is None:
                continue
            (exports / f"{name}.json").write_text(json.dumps({
                "onnx_file": f"{name}.onnx", "precision": "fp32", "run_dir": str(comparison / name),
                "checkpoint": "best", "file_size_bytes": 1000, "onnx_test": {"top1": exported, "top5": 90.0}}))
            (exports / f"{name}.onnx").write_bytes(b"\0")
            latency.append({"model": f"{name}.onnx", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                            "batch_size": 1, "threads": 2, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50,
                            "cpu_model": "Test CPU", "model_path": str(exports / f"{name}.onnx")})
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(comparison / "results.csv", index=False)
    pd.DataFrame(latency).to_csv(exports / "latency.csv", index=False)
    return comparison, exports


def test_no_recommendation_from_a_row_with_fewer_seeds_than_were_compared(tmp_path, capsys):
    """The case a user met: only ipasd's seed 0 exported (24.62 %) against ce's and cs-kd's two seeds each; the
    old table ranked ipasd first and concluded "Best under 2 ms: ipasd" although its 2-seed mean was 22.46."""
    from ipasdctl.analysis.report import selection_section

    comparison, exports = _comparison_with_exports(tmp_path, {
        "ce": {0: (22.3, 22.30), 1: (22.4, 22.42)}, "cs-kd": {0: (22.4, 22.38), 1: (22.4, 22.42)},
        "ipasd": {0: (24.6, 24.62), 1: (20.3, None)}})
    table = selection_table([comparison], exports, 2.0)
    ipasd = row(table, "ipasd", "resnet8")
    assert (ipasd["seeds"], ipasd["seeds_compared"], ipasd["missing_seeds"]) == (1, 2, "1")
    assert row(table, "ce", "resnet8")["missing_seeds"] == ""
    assert best_under_budget(table, 2.0).empty

    text = "\n".join(selection_section([comparison], exports, 2.0, tmp_path))
    err = capsys.readouterr().err
    assert "Best under" not in text
    said = "No recommendation under 2 ms on cifar10: ipasd / resnet8 (fp32) has 1 of 2 seeds (missing: seed 1)"
    assert said in text and said in err
    written = pd.read_csv(tmp_path / "selection.csv", dtype={"missing_seeds": str}, keep_default_na=False)
    assert written["missing_seeds"].tolist() == ["1", "", ""]  # ipasd (24.62 on one seed) first


@pytest.mark.parametrize("first,second,said", [
    ([80.0, 81.0, 82.0], [78.0, 79.1, 79.9], "is larger than the seed-to-seed noise"),
    ([80.0, 78.0, 82.0], [79.0, 79.5, 80.5], "is not larger than the seed-to-seed noise"),
    ([80.0, 81.0], [78.0, 79.0], "cannot be told from the seed-to-seed noise: the paired t-test needs 3 seeds"),
])
def test_a_pick_says_whether_its_lead_over_the_next_row_is_larger_than_the_seed_noise(tmp_path, first, second, said):
    from scipy import stats

    from ipasdctl.analysis.report import selection_section
    from ipasdctl.analysis.selection import recommend

    comparison, exports = _comparison_with_exports(tmp_path, {
        "ipasd": {s: (v, v) for s, v in enumerate(first)}, "ce": {s: (v, v) for s, v in enumerate(second)}})
    table = selection_table([comparison], exports, 2.0)
    (pick,) = recommend(table, 2.0)
    assert pick.pick["method"] == "ipasd" and pick.runner_up["method"] == "ce"
    differences = [a - b for a, b in zip(first, second)]
    assert pick.lead["pairs"] == len(first) and pick.lead["mean"] == pytest.approx(sum(differences) / len(first))
    text = "\n".join(selection_section([comparison], exports, 2.0, tmp_path))
    line = next(line for line in text.splitlines() if line.startswith("**Best under 2 ms on cifar10:** ipasd"))
    assert said in line and "ce / resnet8 (fp32)" in line
    if len(first) >= 3:
        assert f"p = {stats.ttest_rel(first, second).pvalue:.3g}" in line
