"""`ipasdctl compare`: the plan, the run folders, the tables, reruns (skip, resume, refuse) and input errors.

Training runs are tiny: the embedded digits set cut to 64 training images, ResNet-8, 1-2 epochs, batch 32.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pandas as pd
import pytest
import yaml

from ipasdctl import training
from ipasdctl.studies import compare
from ipasdctl.studies import plan as planning
from ipasdctl.studies.summary import summary_table
from ipasdctl.training import trainer as trainer_module
from ipasdctl.cli import main
from ipasdctl.methods import METHODS
from tests.helpers import run_cli, tiny_recipe

TINY = ["--recipe", "demo", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--set", "data.train_subset=64"]
RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "changes_images", "best_top1", "last_top1", "best_epoch",
                  "best_top5", "params", "macs", "train_seconds", "images_per_second", "run_dir"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """ce and ipasd, seeds 0 and 1, trained once for the module through the library functions."""
    out = tmp_path_factory.mktemp("comparison") / "c"
    plan = planning.plan(tiny_recipe(), "ce", [0, 1], out)
    messages: list[str] = []
    compare.run(plan, training.Progress(enabled=False), messages.append)  # it writes the tables too
    return out, messages


def copy_of(finished, tmp_path):
    """A private copy (file times kept) for tests that rerun into the folder."""
    out = tmp_path / "c"
    shutil.copytree(finished[0], out, copy_function=shutil.copy2)
    return out


def file_times(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ a comparison


def test_every_method_and_seed_gets_a_run_folder_and_a_results_row(finished):
    out, messages = finished
    names = ["[1/4] ce-s0", "[2/4] ipasd-s0", "[3/4] ce-s1", "[4/4] ipasd-s1"]
    assert [m.split(":")[0] for m in messages] == [name for name in names for _ in range(2)]
    assert all("training" in m for m in messages[::2])
    # one line per finished run: its accuracy, runs done/total and the time left (from the finished runs)
    assert all(" finished in " in m and "runs done" in m for m in messages[1::2])
    assert "1/4 runs done, about" in messages[1] and messages[-1].endswith("4/4 runs done")

    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == [*RESULT_COLUMNS, "status"]
    assert results["status"].tolist() == ["finished"] * 4
    assert list(zip(results["method"], results["seed"])) == [("ce", 0), ("ipasd", 0), ("ce", 1), ("ipasd", 1)]
    for row in results.itertuples(index=False):
        run_dir = out / f"{row.method}-s{row.seed}"
        assert row.run_dir == str(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["finished"] is True and summary["method"] == row.method and summary["seed"] == row.seed
        for key in ["best_top1", "last_top1", "best_top5", "train_seconds", "images_per_second"]:
            assert getattr(row, key) == pytest.approx(summary[key], rel=1e-5), key
        assert (row.best_epoch, row.params, row.macs) == (summary["best_epoch"], summary["params"], summary["macs"])
        assert (row.arch, row.dataset, row.epochs) == ("resnet8", "digits", 1)
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["seed"] == row.seed and config["method"]["name"] == row.method

    record = yaml.safe_load((out / "comparison.yaml").read_text())
    assert record["methods"] == ["ce", "ipasd"] and record["seeds"] == [0, 1] and record["main"] == "ipasd"
    assert record["recipe"]["data"]["train_subset"] == 64 and record["recipe"]["train"]["epochs"] == 1
    assert "seed" not in record["recipe"]["train"]


def test_summary_csv_holds_mean_and_sample_std_of_the_results_rows(finished):
    out, _ = finished
    results = pd.read_csv(out / "results.csv")
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert sorted(summary.index) == ["ce", "ipasd"]
    expected = {}
    for method in ["ce", "ipasd"]:
        for column in ["best_top1", "last_top1"]:
            values = [float(v) for m, v in zip(results["method"], results[column]) if m == method]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            expected[method, column] = mean
            assert summary.loc[method, f"{column}_mean"] == pytest.approx(mean, abs=1e-3)
            assert summary.loc[method, f"{column}_std"] == pytest.approx(std, abs=1e-3)
        assert summary.loc[method, "runs"] == 2
    for column in ["best_top1", "last_top1"]:
        assert summary.loc["ipasd", f"delta_{column}"] == pytest.approx(
            expected["ipasd", column] - expected["ce", column], abs=1e-3)
        assert summary.loc["ce", f"delta_{column}"] == 0

    markdown = (out / "summary.md").read_text()
    assert "optimistic" in markdown and "honest" in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ") and "`" in line]
    assert len(table_rows) == 2
    ce_row = next(row for row in table_rows if "`ce`" in row)
    mean, std = summary.loc["ce", "last_top1_mean"], summary.loc["ce", "last_top1_std"]
    assert f"{mean:.2f} ± {std:.2f}" in ce_row and "(reference)" in ce_row


def test_summary_table_formulas_on_hand_made_results():
    results = pd.DataFrame({
        "method": ["ce", "ce", "ipasd", "ipasd", "ipasd", "ls"],
        "best_top1": [71.0, 73.0, 76.0, 74.0, 75.0, 80.0],
        "last_top1": [70.0, 72.0, 75.0, 73.0, 77.0, 71.0],
        "train_seconds": [10.0, 12.0, 20.0, 22.0, 24.0, 5.0],
    })
    table = summary_table(results)
    # by last-epoch mean (75 > 71 = 71), a tie broken by best-epoch mean (ls 80 > ce 72)
    assert table["method"].tolist() == ["ipasd", "ls", "ce"]
    rows = table.set_index("method")
    assert rows.loc["ipasd", "last_top1_mean"] == pytest.approx(75.0)
    assert rows.loc["ipasd", "last_top1_std"] == pytest.approx(math.sqrt(((75 - 75) ** 2 + (73 - 75) ** 2 + (77 - 75) ** 2) / 2))
    assert rows.loc["ce", "best_top1_std"] == pytest.approx(math.sqrt(2.0))  # sample std: (1 + 1) / (2 - 1)
    assert math.isnan(rows.loc["ls", "last_top1_std"])  # one run: no spread to report
    assert rows.loc["ipasd", "delta_last_top1"] == pytest.approx(75.0 - 71.0)
    assert rows.loc["ls", "delta_best_top1"] == pytest.approx(80.0 - 72.0)
    assert rows.loc["ls", "delta_last_top1"] == pytest.approx(0.0)
    assert rows.loc["ipasd", "train_seconds_mean"] == pytest.approx(22.0)
    assert rows["rank"].to_dict() == {"ipasd": 1, "ls": 2, "ce": 2}  # ties share a rank
    assert rows["runs"].to_dict() == {"ipasd": 3, "ce": 2, "ls": 1}


def test_summary_ties_on_last_epoch_are_ordered_by_best_epoch():
    results = pd.DataFrame({"method": ["ce", "ls"], "best_top1": [70.0, 80.0], "last_top1": [60.0, 60.0],
                            "train_seconds": [1.0, 1.0]})
    assert summary_table(results)["method"].tolist() == ["ls", "ce"]


# ------------------------------------------------------------------------------------------------ reruns


def test_rerun_skips_finished_runs_and_prints_the_folder_last(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    runs_before = {k: v for k, v in file_times(out).items() if "-s" in k}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(training, "train_into", no_training)
    monkeypatch.setattr(training, "resume", no_training)
    code, stdout, stderr = run_cli(["compare", "--baselines", "ce", "--seeds", "0,1", *TINY, "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(out)
    skipped = [line for line in stderr.splitlines() if "finished, skipped" in line]
    assert [line.split(":")[0] for line in skipped] == ["[1/4] ce-s0", "[2/4] ipasd-s0", "[3/4] ce-s1", "[4/4] ipasd-s1"]
    assert {k: v for k, v in file_times(out).items() if "-s" in k} == runs_before

    # a rerun over fewer seeds uses the runs there are; the tables describe that command
    code, stdout, stderr = run_cli(["compare", "--seeds", "1", *TINY, "--out", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    assert stderr == ""  # --quiet
    results = pd.read_csv(out / "results.csv")
    assert list(zip(results["method"], results["seed"])) == [("ce", 1), ("ipasd", 1)]
    assert pd.read_csv(out / "summary.csv")["runs"].tolist() == [1, 1]


def test_rerun_with_another_recipe_is_refused_before_anything_changes(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    before = file_times(out)
    monkeypatch.setattr(training, "train_into", lambda *a, **k: pytest.fail("trained"))
    tiny_two_epochs = [*TINY, "--epochs", "2"]
    for seeds in ["0,1", "7"]:  # same runs, and new seeds (which only comparison.yaml can tell apart)
        code, _, stderr = run_cli(["compare", "--seeds", seeds, *tiny_two_epochs, "--out", str(out)], capsys)
        assert code == 2
        assert len(stderr.strip().splitlines()) == 1 and "train.epochs" in stderr and "another recipe" in stderr
    # the main method's own parameters are part of its runs' recipe
    code, _, stderr = run_cli(["compare", "--seeds", "0", *TINY, "--set", "method.w_div=0.5", "--out", str(out)],
                              capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "ipasd-s0" in stderr and "method.w_div" in stderr
    assert file_times(out) == before


def test_interrupted_comparison_resumes_its_run_and_retrains_a_partial_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "c"
    args = ["compare", "--method", "ce", "--seeds", "0,1", *TINY, "--epochs", "2", "--out", str(out)]
    real_evaluate, evaluations = trainer_module.test_metrics, []

    def evaluate_then_press_ctrl_c(*args, **kwargs):
        # Ctrl-C during the second epoch's evaluation: the trainer stops within the test pass and checkpoints
        # the epoch's steps (epoch 1 is in metrics.csv; the resumed run evaluates epoch 2)
        evaluations.append(1)
        if len(evaluations) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "test_metrics", evaluate_then_press_ctrl_c)
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 130
    assert "rerun the same `ipasdctl compare` command" in stderr.strip().splitlines()[-1]
    first = out / "ce-s0"
    assert (first / "checkpoints" / "last.pt").is_file() and not (first / "summary.json").exists()
    first_epoch_rows = (first / "metrics.csv").read_text().splitlines()
    assert len(first_epoch_rows) == 2  # header + epoch 1
    assert not (out / "ce-s1").exists()
    monkeypatch.setattr(trainer_module, "test_metrics", real_evaluate)

    (out / "ce-s1").mkdir()  # a leftover of a run that died before its first checkpoint
    (out / "ce-s1" / "metrics.csv").write_text("epoch\n1\n")
    calls = []
    real_train_into, real_resume = training.train_into, training.resume

    def spy_train_into(recipe, run_dir, progress=None):
        calls.append(("train_into", run_dir.name))
        return real_train_into(recipe, run_dir, progress)

    def spy_resume(run_dir, recipe=None, progress=None):
        calls.append(("resume", run_dir.name))
        return real_resume(run_dir, recipe, progress)

    monkeypatch.setattr(training, "train_into", spy_train_into)
    monkeypatch.setattr(training, "resume", spy_resume)
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert calls == [("resume", "ce-s0"), ("train_into", "ce-s1")]
    assert "[1/2] ce-s0: resuming after epoch 1/2" in stderr
    metrics = (first / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 3 and metrics[:2] == first_epoch_rows  # epoch 1 kept (its timing too), epoch 2 added
    assert pd.read_csv(out / "ce-s1" / "metrics.csv")["epoch"].tolist() == [1, 2]
    results = pd.read_csv(out / "results.csv")
    assert list(zip(results["method"], results["seed"])) == [("ce", 0), ("ce", 1)]
    assert results["epochs"].tolist() == [2, 2]
    assert stdout.strip().splitlines()[-1] == str(out)


# ------------------------------------------------------------------------------------------------ input


def test_unknown_baseline_is_one_line_naming_the_known_methods_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "c"
    code, _, stderr = run_cli(["compare", "--baselines", "ce,ipsad", *TINY, "--out", str(out)], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown method 'ipsad'" in lines[0] and "did you mean 'ipasd'" in lines[0]
    known = lines[0].split("known: ", 1)[1].split(", ")
    assert known == ["all", *METHODS.names()]
    assert not out.exists()


@pytest.mark.parametrize("seeds", ["0,one", "0,1.5", "", "0,,1", "-1"])
def test_seeds_that_are_not_integers_exit_2(tmp_path, capsys, seeds):
    out = tmp_path / "c"
    code, _, stderr = run_cli(["compare", "--seeds", seeds, *TINY, "--out", str(out)], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "--seeds" in stderr
    assert not out.exists()


def test_parse_seeds_keeps_order_and_drops_duplicates():
    assert planning.parse_seeds(" 2, 0,2 ,1") == [2, 0, 1]


def test_all_means_every_registered_method_with_ce_first():
    names = planning.method_names("ipasd", "all")
    assert names[:2] == ["ce", "ipasd"] and sorted(names) == METHODS.names() and len(set(names)) == len(names)
    assert planning.method_names("ipasd", "ipasd, ce") == ["ce", "ipasd"]


def test_plan_gives_method_parameters_to_the_main_method_only(tmp_path):
    recipe = tiny_recipe(sets=["method.w_div=0.5"])
    plan = planning.plan(recipe, "ce", "3,0", tmp_path / "c")
    assert [(r.method, r.seed, r.run_dir.name) for r in plan.runs] == [
        ("ce", 3, "ce-s3"), ("ipasd", 3, "ipasd-s3"), ("ce", 0, "ce-s0"), ("ipasd", 0, "ipasd-s0")]
    for run in plan.runs:
        assert run.recipe.train.seed == run.seed
        if run.method == "ipasd":
            assert run.recipe.method["w_div"] == 0.5 and run.recipe.method["tau"] == 0.3  # defaults filled in
        else:
            assert run.recipe.method == {"name": "ce"}
    assert recipe.train.seed == 0 and recipe.method["w_div"] == 0.5  # the given recipe is not changed


def test_tf_kd_self_distils_from_the_ce_run_of_its_seed(tmp_path):
    if "tf-kd-self" not in METHODS:
        pytest.skip("tf-kd-self is not registered in this tree")
    out = tmp_path / "c"
    plan = planning.plan(tiny_recipe(), "tf-kd-self", [0, 4], out)
    order = [r.run_dir.name for r in plan.runs]
    for seed in [0, 4]:
        run = next(r for r in plan.runs if r.method == "tf-kd-self" and r.seed == seed)
        assert run.recipe.method["teacher"] == str((out / f"ce-s{seed}").resolve())
        assert order.index(f"ce-s{seed}") < order.index(f"tf-kd-self-s{seed}")


def test_default_out_is_named_after_the_recipe():
    assert str(planning.plan(tiny_recipe(), "", [0]).out) == os.path.join("comparisons", "demo")


@pytest.mark.parametrize("method, setting", [("ls", "method.eps=2"), ("ps-kd", "method.alpha_T=-1"),
                                             ("tf-kd-reg", "method.temperature=0")])
def test_a_bad_method_parameter_is_refused_before_the_first_run_trains(method, setting, tmp_path, capsys,
                                                                     monkeypatch):
    """The value checks run when the parameters are parsed, so ce (trained first) is never started."""
    monkeypatch.setattr(training, "train_into", lambda *a, **k: pytest.fail("trained before the bad value was seen"))
    out = tmp_path / "c"
    code, _, stderr = run_cli(["compare", "--method", method, "--seeds", "0", *TINY, "--set", setting,
                               "--out", str(out)], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert setting.split("=")[0] in stderr
    assert not out.exists()


def test_the_reference_run_comes_from_the_method_not_from_compare(tmp_path):
    """tf-kd-self declares the parameter that names its teacher run; the plan fills it with ce of each seed."""
    from ipasdctl.methods import METHODS

    declaring = [name for name in METHODS.names() if METHODS.get(name).reference_run_param]
    assert declaring == ["kd", "tf-kd-self"]
    comparison = planning.plan(tiny_recipe(), "tf-kd-self", [0, 3], tmp_path / "c")
    teachers = {run.seed: run.recipe.method["teacher"] for run in comparison.runs if run.method == "tf-kd-self"}
    assert teachers == {seed: str((tmp_path / "c" / f"ce-s{seed}").resolve()) for seed in (0, 3)}
