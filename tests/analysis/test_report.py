"""`ipasdctl eval` and `ipasdctl report` end to end on tiny trained runs (digits, resnet8, 2 epochs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ipasdctl.config import load_recipe
from ipasdctl.training import Progress, train, train_into
from ipasdctl.analysis.evaluation import EVAL_FILES, load_eval
from ipasdctl.analysis.collect import Run, group_runs
from tests.helpers import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TSNE_POINTS = "60"  # keeps t-SNE cheap on the shared CPUs
RESULT_COLUMNS = ["method", "seed", "arch", "dataset", "epochs", "best_top1", "last_top1", "best_epoch",
                  "best_top5", "params", "macs", "train_seconds", "images_per_second"]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 5000 and data[:8] == PNG_SIGNATURE, path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    recipe = load_recipe("demo", {"train": {"epochs": 2}, "data": {"train_subset": 64}})
    return train(recipe, tmp_path_factory.mktemp("runs"), progress=Progress(enabled=False))


@pytest.fixture(scope="module")
def comparison(trained_run, tmp_path_factory) -> Path:
    """A comparison folder as `compare` writes it: ipasd seeds 0 and 1, ce seed 0, results.csv with one row each.

    ipasd-s0 is a copy of `trained_run` without its eval files, so the report has to evaluate it."""
    folder = tmp_path_factory.mktemp("comparison")
    shutil.copytree(trained_run, folder / "ipasd-s0", ignore=shutil.ignore_patterns(*EVAL_FILES, ".lock"))
    for method, seed in (("ipasd", 1), ("ce", 0)):
        recipe = load_recipe("demo", {"method": {"name": method},
                                      "train": {"epochs": 2, "seed": seed}, "data": {"train_subset": 64}})
        train_into(recipe, folder / f"{method}-s{seed}", Progress(enabled=False))
    rows = []
    for run_dir in sorted(folder.iterdir()):
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({**{c: summary[c] for c in RESULT_COLUMNS}, "run_dir": run_dir.name})  # relative, as allowed
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    return folder


# ----------------------------------------------------------------------------------------------- eval


def test_eval_of_a_run_folder_writes_every_file(trained_run, capsys):
    code, out, err = run_cli(["eval", str(trained_run), "--tsne-points", TSNE_POINTS], capsys)
    assert code == 0, err
    for name in EVAL_FILES:
        path = trained_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert_png(trained_run / "reliability.png")
    assert_png(trained_run / "embedding_tsne.png")
    assert out.strip().splitlines()[-1] == str(trained_run / "eval.json")

    result = json.loads((trained_run / "eval.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    # the best checkpoint on the same test set: the engine's own test top-1 of the best epoch
    assert result["checkpoint"] == "best" and result["epoch"] == summary["best_epoch"]
    assert result["top1"] == pytest.approx(summary["best_top1"], abs=1e-3)
    assert result["top5"] == pytest.approx(summary["best_top5"], abs=1e-3)
    assert result["num_test"] == 359 and result["num_classes"] == 10
    assert sum(result["reliability"]["count"]) == 359 and result["ece_bins"] == 15
    assert 0.0 <= result["ece"] <= 1.0 and result["nll"] > 0
    compact = result["compactness"]
    assert -1.0 <= compact["mean_cosine_to_class_mean"] <= 1.0 and compact["intra_inter_distance_ratio"] > 0
    assert result["tsne_points"] == int(TSNE_POINTS)

    per_class = pd.read_csv(trained_run / "per_class.csv")
    assert list(per_class["class_name"].astype(str)) == [str(d) for d in range(10)]
    assert per_class["count"].sum() == 359
    assert 100.0 * per_class["correct"].sum() / 359 == pytest.approx(result["top1"])
    assert (per_class["correct"] / per_class["count"] * 100).tolist() == pytest.approx(per_class["top1"].tolist(), abs=1e-4)
    tsne = pd.read_csv(trained_run / "embedding_tsne.csv")
    assert len(tsne) == int(TSNE_POINTS) and set(tsne.columns) == {"x", "y", "label"}


def test_eval_of_an_onnx_model_writes_what_eval_of_a_run_writes_beside_it(trained_run, tmp_path, capsys):
    from ipasdctl.deploy import export_onnx

    export_onnx(trained_run, tmp_path, validation_batch_sizes=(1,))
    model = tmp_path / f"{trained_run.name}.onnx"
    capsys.readouterr()  # drop what the exporter printed
    code, out, err = run_cli(["eval", str(model), "--batch-size", "100"], capsys)
    assert code == 0, err
    stem = tmp_path / trained_run.name
    written = json.loads(stem.with_suffix(".eval.json").read_text())
    assert written["num_test"] == 359 and written["model"] == str(model) and written["precision"] == "fp32"
    # the keys of the run's eval.json, less those that need the embeddings an exported model does not expose
    if not (trained_run / "eval.json").exists():
        assert run_cli(["eval", str(trained_run), "--tsne-points", TSNE_POINTS, "-q"], capsys)[0] == 0
    of_run = json.loads((trained_run / "eval.json").read_text())
    assert set(of_run) - set(written) == {"run_dir", "seed", "compactness", "tsne_points"}
    assert set(written) - set(of_run) == {"model", "source_run", "precision"}
    # the same test outputs (fp32 onnxruntime vs PyTorch: at most a near-tie flips one image)
    for key in ("top1", "top5"):
        assert abs(written[key] - of_run[key]) <= 100 / 359 + 1e-9
    assert written["nll"] == pytest.approx(of_run["nll"], abs=1e-3) and written["ece"] == pytest.approx(of_run["ece"], abs=0.01)
    per_class = pd.read_csv(stem.with_suffix(".per_class.csv"))
    assert per_class["count"].sum() == 359 and 100.0 * per_class["correct"].sum() / 359 == pytest.approx(written["top1"])
    assert "mean_confidence" in per_class.columns and "mean_cosine_to_class_mean" not in per_class.columns
    assert stem.with_suffix(".reliability.png").stat().st_size > 0
    summary_line, path_line = out.strip().splitlines()
    assert summary_line.startswith(f"top-1 {written['top1']:.2f}%") and path_line == str(stem.with_suffix(".eval.json"))


@pytest.mark.parametrize("option", [["--checkpoint", "last"], ["--device", "cpu"], ["--tsne-points", "50"]])
def test_eval_of_an_onnx_model_refuses_options_that_do_not_apply(option, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"never read: the options are checked first")
    code, out, err = run_cli(["eval", str(model), *option], capsys)
    assert code == 2 and err.count("\n") == 1 and out == ""
    assert err.startswith(f"error: {option[0]} does not apply to a .onnx model")
    assert not (tmp_path / "model.eval.json").exists()


@pytest.mark.parametrize("make", ["empty_folder", "file", "missing", "missing_onnx"])
def test_eval_of_bad_input_is_one_line_exit_2(make, tmp_path, capsys):
    target = {"empty_folder": tmp_path, "file": tmp_path / "notes.txt", "missing": tmp_path / "nowhere",
              "missing_onnx": tmp_path / "model.onnx"}[make]
    if make == "file":
        target.write_text("hello")
    code, out, err = run_cli(["eval", str(target)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""


def test_eval_rejects_an_unknown_checkpoint(trained_run, capsys):
    code, _, err = run_cli(["eval", str(trained_run), "--checkpoint", "newest"], capsys)
    assert code == 2 and "best or last" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------- report


def test_report_of_a_comparison_renders_every_plot(comparison, tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, err = run_cli(["report", str(comparison), "--out", str(out_dir), "--tsne-points", TSNE_POINTS], capsys)
    assert code == 0, err
    report = out_dir / "report.md"
    assert out.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    plots = ["curves-digits-resnet8-2ep.png", "loss_terms-digits-resnet8-2ep.png", "eval_reliability-digits-resnet8-2ep.png",
             "eval_tsne-digits-resnet8-2ep.png"]
    for name in plots:
        assert_png(out_dir / name)
        assert f"]({name})" in text, name
    assert "## digits, resnet8, 2 epochs" in text
    # the runs that lacked eval.json were evaluated on the way
    for run in ("ipasd-s0", "ipasd-s1", "ce-s0"):
        assert (comparison / run / "eval.json").is_file()
    counted = [line.split("]")[0] + "]" for line in err.splitlines() if " evaluating " in line]
    assert counted == ["[1/3]", "[2/3]", "[3/3]"], err  # progress per run: which of how many

    # the summary table: ipasd's best top-1 is the mean ± sample std of its two seeds
    results = pd.read_csv(comparison / "results.csv")
    ipasd = results[results["method"] == "ipasd"]["best_top1"].tolist()
    mean = sum(ipasd) / 2
    std = (sum((v - mean) ** 2 for v in ipasd) / 1) ** 0.5
    ipasd_row = next(line for line in text.splitlines() if line.startswith("| ipasd |"))
    assert ipasd_row.split(" | ")[1:3] == ["0, 1", f"{mean:.2f} ± {std:.2f}"]
    ce_row = next(line for line in text.splitlines() if line.startswith("| ce |"))
    assert ce_row.split(" | ")[2] == f"{results[results['method'] == 'ce']['best_top1'].item():.2f}"

    runs = pd.read_csv(out_dir / "report_runs.csv")
    assert sorted(runs["method"]) == ["ce", "ipasd", "ipasd"]
    assert runs["ece"].between(0, 1).all()


def test_report_defaults_to_the_first_folder_and_takes_run_folders(comparison, trained_run, capsys):
    # a stale eval.json (of a best checkpoint that has been replaced since) is evaluated again
    stale = {"checkpoint": "best", "epoch": 99, "top1": -1.0, "top5": -1.0, "nll": 0.0, "ece": 0.0,
             "reliability": {}, "compactness": {}}
    (trained_run / "eval.json").write_text(json.dumps(stale))
    code, out, err = run_cli(["report", str(trained_run), str(comparison / "ce-s0"), "--tsne-points", TSNE_POINTS],
                             capsys)
    assert code == 0, err
    report = trained_run / "report.md"
    assert out.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    assert "| ipasd |" in text and "| ce |" in text
    assert_png(trained_run / "curves-digits-resnet8-2ep.png")
    fresh = json.loads((trained_run / "eval.json").read_text())
    assert fresh["epoch"] == json.loads((trained_run / "summary.json").read_text())["best_epoch"]
    assert fresh["top1"] >= 0
    # an eval.json without the fields this version writes counts as missing
    (trained_run / "eval.json").write_text(json.dumps({"top1": 50.0}))
    assert load_eval(trained_run) is None
    (trained_run / "eval.json").unlink()


def test_report_selection_table_from_exports(comparison, tmp_path, capsys):
    exports = tmp_path / "exports"
    exports.mkdir()
    out_dir = tmp_path / "report"
    code, _, err = run_cli(["report", str(comparison), "--out", str(out_dir), "--exports", str(exports),
                            "--max-latency-ms", "5", "--tsne-points", TSNE_POINTS], capsys)
    assert code == 0, err
    text = (out_dir / "report.md").read_text()
    assert "## Selection (exported models)" in text
    assert "No model meets the budget under 5 ms" in text  # nothing exported, nothing benchmarked
    selection = pd.read_csv(out_dir / "selection.csv")
    assert sorted(selection["method"]) == ["ce", "ipasd"]


def test_report_of_one_exported_and_benchmarked_run_gives_its_selection_table(trained_run, tmp_path, capsys,
                                                                               monkeypatch):
    """The README's first chain, `train ... export --onnx --int8 bench report`: no comparison folder, and yet
    the run's accuracy, size and latency per precision in selection.csv; --no-tsne leaves the t-SNE out."""
    import torch

    from ipasdctl.deploy.bench import bench
    from ipasdctl.deploy.export import export_onnx

    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, dynamo=True, **k: real_export(*a, dynamo=False, **k))
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(*EVAL_FILES, ".lock"))
    exports = tmp_path / "exports"
    record = export_onnx(run, exports, int8=True, calib_samples=16, validation_batch_sizes=(1, 2))
    for model in (record["onnx_path"], record["int8"]["onnx_path"]):
        bench(model, [1, 2], threads=1, runs=3, warmup=0, with_torch=False)
    out_dir = tmp_path / "report"
    code, _, err = run_cli(["report", str(run), "--exports", str(exports), "--out", str(out_dir), "--no-tsne",
                            "--max-latency-ms", "1000"], capsys)
    assert code == 0, err
    selection = pd.read_csv(out_dir / "selection.csv").set_index("precision")
    latency = pd.read_csv(exports / "latency.csv")
    latency = latency[latency["batch_size"] == 1].set_index("model")  # the table's latency: batch 1
    assert sorted(selection.index) == ["fp32", "int8"]
    for precision, stem in (("fp32", record["name"]), ("int8", f"{record['name']}-int8")):
        saved = json.loads((exports / f"{stem}.json").read_text())
        assert selection.loc[precision, "top1"] == pytest.approx(saved["onnx_test"]["top1"], abs=1e-4)
        assert selection.loc[precision, "file_size_mb"] == pytest.approx(saved["file_size_bytes"] / 1e6, rel=1e-5)
        assert selection.loc[precision, "latency_ms"] == pytest.approx(latency.loc[f"{stem}.onnx", "p50_ms"], rel=1e-5)
        assert (selection.loc[precision, "seeds"], selection.loc[precision, "seeds_compared"]) == (1, 1)
    text = (out_dir / "report.md").read_text()
    assert "## Selection (exported models)" in text and "No selection table" not in text
    assert "**Best under 1000 ms on digits:**" in text
    assert "](pareto-digits.png)" in text and (out_dir / "pareto-digits.png").stat().st_size > 0
    # --no-tsne: no t-SNE panel, and the run evaluated on the way computed none
    assert not list(out_dir.glob("eval_tsne-*")) and "t-SNE of test embeddings" not in text
    assert (run / "eval.json").is_file() and not (run / "embedding_tsne.png").exists()


def test_report_tables_rank_methods_by_last_epoch_top1_as_summary_md_does():
    from ipasdctl.analysis.report import ranked, summary_rows

    def run(method, seed, best, last):
        row = {"method": method, "seed": seed, "dataset": "digits", "arch": "resnet8", "epochs": 2,
               "best_top1": best, "last_top1": last}
        return Run(Path(f"/c/{method}-s{seed}"), row, Path("/c"))

    by_method = {"ce": [run("ce", 0, 90.0, 70.0), run("ce", 1, 90.0, 72.0)],  # last 71
                 "ipasd": [run("ipasd", 0, 80.0, 75.0)],                      # last 75
                 "ls": [run("ls", 0, 95.0, 71.0)]}                            # last 71, best 95: before ce
    assert list(ranked(by_method)) == ["ipasd", "ls", "ce"]
    header, rows, _ = summary_rows(ranked(by_method))
    assert [r[0] for r in rows] == ["ipasd", "ls", "ce"]
    ci = header.index("last top-1 95 % CI")
    assert [r[ci] for r in rows] == ["—", "—", "—"]  # fewer than 3 seeds: left out, not [-5.45, 125.51]
    three = {"ce": [run("ce", s, 90.0, v) for s, v in enumerate((98.0, 99.5, 100.0))]}
    assert summary_rows(three)[1][0][ci].endswith(", 100.00]")  # clipped to the range


def test_runs_group_by_dataset_arch_epochs_and_repeated_seeds_keep_their_source():
    def run(method, seed, epochs, source):
        row = {"method": method, "seed": seed, "dataset": "digits", "arch": "resnet8", "epochs": epochs}
        return Run(Path(f"/{source}/{method}-s{seed}"), row, Path(f"/{source}"))

    groups = group_runs([run("ipasd", 1, 2, "a"), run("ipasd", 0, 2, "a"), run("ce", 0, 2, "a"),
                         run("ipasd", 0, 2, "b"), run("ipasd", 0, 5, "c")])
    assert list(groups) == [("digits", "resnet8", "2"), ("digits", "resnet8", "5")]
    two = groups[("digits", "resnet8", "2")]
    assert sorted(two) == ["ce", "ipasd (a)", "ipasd (b)"]  # seed 0 twice: not averaged together
    assert [r.row["seed"] for r in two["ipasd (a)"]] == [0, 1]
    assert list(groups[("digits", "resnet8", "5")]) == ["ipasd"]


@pytest.mark.parametrize("args", [["report", "{tmp}"], ["report", "{tmp}/missing"],
                                  ["report", "{comparison}", "--exports", "{tmp}/no-exports"],
                                  ["report", "{comparison}", "--max-latency-ms", "-1"]])
def test_report_of_bad_input_is_one_line_exit_2(args, comparison, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, comparison=comparison) for a in args]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out == ""


def test_epoch_axes_tick_whole_epochs_only():
    from matplotlib.figure import Figure

    from ipasdctl.analysis.plots import integer_epochs

    ax = Figure().subplots()
    ax.plot([1, 2, 3, 4], [10.0, 20.0, 30.0, 40.0])
    integer_epochs(ax)
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)  # not 1.25, 1.5, ...
