"""Chained subcommands, the Python API and `predict`: one invocation from recipe to the measured model, resumable,
each link the same files as the command alone; errors of any link before anything trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer

from ipasdctl.cli import app, chain, main
from ipasdctl.errors import UserError
from tests.helpers import run_cli

TINY_TRAIN = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--set", "data.train_subset=64", "-q"]
BENCH = ["--runs", "2", "--warmup", "0", "--batch-sizes", "1", "--no-torch", "--threads", "1"]


def test_the_command_line_splits_where_a_command_name_stands_in_for_an_option_or_argument():
    commands = typer.main.get_command(app).commands
    links = chain.split(["train", "--name", "bench", "-q", "export", "--onnx", "--int8", "bench", "--runs", "3",
                         "report", "--max-latency-ms", "2"], commands)
    assert links == [["train", "--name", "bench", "-q"], ["export", "--onnx", "--int8"], ["bench", "--runs", "3"],
                     ["report", "--max-latency-ms", "2"]]
    assert chain.split(["export", "runs/x", "--onnx"], commands) == [["export", "runs/x", "--onnx"]]
    assert chain.split(["--help"], commands) == [["--help"]]


def test_a_bad_option_in_a_later_link_stops_the_chain_before_anything_trains(tmp_path, capsys):
    for bad, message in ((["export", "--onnx", "--opset", "3"], "--opset"), (["export", "--checkpoint", "x"], "best or last"),
                         (["export", "--onnx", "bench", "--batch-sizes", "0"], "--batch-sizes"),
                         (["export", "--onnx", "--no-such-option"], "no-such-option")):
        code, _, err = run_cli(["train", *TINY_TRAIN, "--out", str(tmp_path / "runs"), *bad], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (bad, err)
        assert not (tmp_path / "runs").exists()


def test_a_command_without_its_input_says_how_to_give_it(tmp_path, capsys):
    for args, message in ((["export", "--onnx"], "`export` needs a run folder"),
                          (["bench"], "`bench` needs an exported .onnx model"),
                          (["report"], "`report` needs run folders or comparison folders"),
                          (["train", "--nproc", "2", "export", "--onnx"], "cannot start a chain")):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_train_export_bench_chain_writes_what_the_separate_commands_write_and_reruns_for_free(tmp_path, capsys):
    chained, alone = tmp_path / "chained", tmp_path / "alone"
    code, out, err = run_cli(["train", *TINY_TRAIN, "--out", str(chained / "runs"),
                              "export", "--onnx", "--int8", "--out", str(chained / "exports"), "bench", *BENCH], capsys)
    assert code == 0, err
    run_dir = next((chained / "runs").iterdir())
    # the same three commands, one by one
    code, out_train, err = run_cli(["train", *TINY_TRAIN, "--out", str(alone / "runs")], capsys)
    assert code == 0, err
    single_run = Path(out_train.strip().splitlines()[-1])
    code, out_export, err = run_cli(["export", str(single_run), "--onnx", "--int8", "--out", str(alone / "exports")],
                                    capsys)
    assert code == 0, err
    for model in sorted((alone / "exports").glob("*.onnx")):
        code, _, err = run_cli(["bench", str(model), *BENCH], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (chained / "exports").iterdir()) == sorted(p.name for p in (alone / "exports").iterdir())
    assert run_dir.name == single_run.name
    assert (run_dir / "metrics.csv").read_text().splitlines()[0] == (single_run / "metrics.csv").read_text().splitlines()[0]
    chained_latency = pd.read_csv(chained / "exports" / "latency.csv")
    assert sorted(chained_latency["model"]) == sorted(pd.read_csv(alone / "exports" / "latency.csv")["model"])
    record = json.loads((chained / "exports" / f"{run_dir.name}.json").read_text())
    assert record["onnx_test"]["n"] > 0 and len(record["source_checkpoint_sha256"]) == 64

    # a rerun: the run is reused, the exports kept, the latencies not measured again
    before = {p.name: p.stat().st_mtime_ns for p in (chained / "exports").iterdir()}
    code, out, err = run_cli(["train", *TINY_TRAIN, "--out", str(chained / "runs"),
                              "export", "--onnx", "--int8", "--out", str(chained / "exports"), "bench", *BENCH], capsys)
    assert code == 0, err
    assert [p.name for p in (chained / "runs").iterdir()] == [run_dir.name]
    assert "kept" in out and "measured before on this CPU" in out  # -q: no word of the reused run on stderr
    assert {p.name: p.stat().st_mtime_ns for p in (chained / "exports").iterdir()} == before


@pytest.mark.slow
def test_compare_export_bench_report_chain_on_cifar_gives_the_selection(tiny_cifar, tmp_path, capsys):
    cmp, exports = tmp_path / "cmp", tmp_path / "exports"
    code, out, err = run_cli([
        "compare", "--dataset", "cifar10", "--data", str(tiny_cifar), "--seeds", "0,1",
        "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--set", "data.train_subset=64", "--out", str(cmp),
        "-q", "export", "--onnx", "--int8", "--calib-samples", "32", "--out", str(exports),
        "bench", *BENCH, "report", "--max-latency-ms", "1000", "--tsne-points", "20"], capsys)
    assert code == 0, err
    # every seed of every compared method (ce and ipasd) exported, fp32 and int8
    assert len(list(exports.glob("*-int8.onnx"))) == 4 and len(list(exports.glob("*.onnx"))) == 8
    selection = pd.read_csv(cmp / "selection.csv")
    assert set(selection["precision"]) == {"fp32", "int8"} and (selection["seeds"] == 2).all()
    assert selection["accuracy_source"].str.startswith("onnxruntime").all()
    report = (cmp / "report.md").read_text()
    assert "Best under 1000 ms on cifar10" in report


def test_the_python_api_trains_the_demo_recipe(tmp_path):
    code = ("from ipasdctl import train, load_model; "
            f"run = train('demo', out={str(tmp_path)!r}, overrides={{'train': {{'epochs': 1}}, "
            "'data': {'train_subset': 64}}); "
            "model, state, recipe = load_model(run); "
            "print(run.name, recipe.method['name'], state['epoch'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["digits-resnet8-ipasd-s0", "ipasd", "1"]
    assert done.stderr == ""  # progress is off unless asked for


def test_predict_agrees_with_eval_on_cifar_pngs_and_with_its_source_run(tiny_cifar, tmp_path, capsys):
    from PIL import Image

    from ipasdctl import export_onnx, predict, train
    from ipasdctl.config import DataConfig
    from ipasdctl.data import build_data
    from ipasdctl.deploy.onnx_files import ort_session

    run = train("demo", out=tmp_path / "runs", overrides={
        "data": {"name": "cifar10", "root": str(tiny_cifar)}, "train": {"epochs": 1, "batch_size": 32}})
    record = export_onnx(run, tmp_path / "exports", validation_batch_sizes=(1,))
    data = build_data(DataConfig(name="cifar10", root=str(tiny_cifar)))
    images, labels = next(iter(data.test_batches(8, "cpu")))
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, raw in enumerate(data.test_images[:8]):
        Image.fromarray(raw.permute(1, 2, 0).numpy()).save(pngs / f"{i}.png")
    # eval's path: the test batch as the loader makes it, through onnxruntime
    session = ort_session(Path(record["onnx_path"]))
    logits = session.run(None, {"images": images.numpy()})[0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    got = predict(record["onnx_path"], [pngs], top_k=3)
    assert [Path(p.image).name for p in got] == [f"{i}.png" for i in range(8)]
    for i, p in enumerate(got):
        assert p.classes[0] == data.class_names[int(expected[i].argmax())]
        assert p.probabilities[0] == pytest.approx(float(expected[i].max()), abs=1e-5)
    from_run = predict(run, [pngs], top_k=3)
    for a, b in zip(got, from_run):
        assert a.classes == b.classes and a.probabilities == pytest.approx(b.probabilities, abs=1e-5)

    code, out, err = run_cli(["predict", record["onnx_path"], str(pngs / "0.png"), "--json", "--top-k", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)[0]["top_k"][0]["class"] == got[0].classes[0]


def test_predict_bad_inputs_are_one_line(tmp_path, capsys):
    from PIL import Image

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(deep)  # mode I;16
    plain = tmp_path / "plain.onnx"  # an ONNX model without ipasdctl's metadata
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(plain))
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    for args, message in (([str(plain), str(good)], "no ipasdctl preprocessing metadata"),
                          ([str(plain), str(tmp_path / "missing.png")], "metadata"),
                          ([str(tmp_path / "nothing.onnx"), str(good)], "does not exist")):
        code, _, err = run_cli(["predict", *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
    from ipasdctl.deploy.predict import load_image
    from ipasdctl.errors import UserError

    with pytest.raises(UserError, match="not an image"):
        load_image(not_an_image, 3)
    with pytest.raises(UserError, match="not 8-bit"):
        load_image(deep, 3)


def test_a_rerun_chain_exports_again_after_calibrate_and_predict_uses_the_temperature(tmp_path, capsys):
    """A kept export must be the one asked for now: a temperature fitted since (ipasdctl calibrate) or other INT8
    options make the chain export again; `predict RUN` divides by the same temperature as the export."""
    from ipasdctl.deploy.predict import predict
    from ipasdctl.runs import RunFolder, load_model

    runs, exports = tmp_path / "runs", tmp_path / "exports"
    chain_args = ["train", *TINY_TRAIN, "--out", str(runs), "--name", "r", "export", "--out", str(exports), "-q"]
    code, _, err = run_cli(chain_args, capsys)
    assert code == 0, err
    model = exports / "digits-resnet8-ipasd-s0"  # named after what it is, not after the run folder "r"
    assert json.loads(model.with_suffix(".json").read_text())["temperature"] is None
    _, state, _ = load_model(runs / "r", "best")
    RunFolder(runs / "r").write_temperature("best", {"temperature": 2.0, "epoch": int(state["epoch"])})
    code, out, err = run_cli(chain_args, capsys)
    assert code == 0, err
    assert json.loads(model.with_suffix(".json").read_text())["temperature"] == 2.0  # exported again, T folded in
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 90)).save(png)
    onnx, run = predict(model.with_suffix(".onnx"), [png], top_k=3)[0], predict(runs / "r", [png], top_k=3)[0]
    assert onnx.classes == run.classes and onnx.probabilities == pytest.approx(run.probabilities, abs=1e-5)


def test_a_chain_reuses_a_run_whose_config_predates_a_recipe_key(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", *TINY_TRAIN, "--out", str(runs), "--name", "r", "eval", "--tsne-points", "3",
                            "-q"], capsys)
    assert code == 0, err
    config = runs / "r" / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.strip().startswith("track:")))  # as a run from before train.track
    code, _, err = run_cli(["train", *TINY_TRAIN, "--out", str(runs), "--name", "r", "eval", "--tsne-points", "3",
                            "-q"], capsys)
    assert code == 0, err
    assert [p.name for p in runs.iterdir()] == ["r"]


def test_calibrate_options_are_checked_before_a_chain_trains(tmp_path, capsys):
    code, _, err = run_cli(["train", *TINY_TRAIN, "--out", str(tmp_path / "runs"), "calibrate", "--batch-size", "0"],
                           capsys)
    assert code == 2 and "--batch-size must be positive" in err and not (tmp_path / "runs").exists()


def test_a_command_follows_the_parameters_of_the_link_it_is_given_not_a_global(tmp_path, capsys):
    """What a chain changes is a parameter of the link: train given reuse returns the finished run of the same
    name; given a link without it (or alone) it starts another beside it."""
    runs = tmp_path / "runs"
    args = ["train", *TINY_TRAIN, "--out", str(runs), "--name", "r"]
    first = app(args=args, standalone_mode=False)
    assert first.run_dirs == [runs / "r"]
    again = app(args=args, standalone_mode=False, obj=chain.Link(made=chain.Outputs(), reuse=True))
    assert again.run_dirs == [runs / "r"] and sorted(p.name for p in runs.iterdir()) == ["r"]
    beside = app(args=args, standalone_mode=False, obj=chain.Link(made=chain.Outputs(), reuse=False))
    assert beside.run_dirs == [runs / "r-2"]
    capsys.readouterr()


def test_a_link_gives_the_inputs_given_else_what_the_links_before_made(tmp_path):
    made = chain.Outputs(run_dirs=[tmp_path / "a"], comparisons=[tmp_path / "c"], exports_dir=tmp_path / "e")
    given = chain.Link(made=made)
    assert given.inputs(tmp_path / "x", "a run folder", "export", "run_dirs") == [tmp_path / "x"]
    assert given.inputs(None, "folders", "report", "comparisons", "run_dirs") == [tmp_path / "c"]
    assert given.exports_dir == tmp_path / "e" and chain.ALONE.exports_dir is None
    with pytest.raises(UserError, match="`bench` in a chain needs an exported .onnx model from a link before it"):
        given.inputs(None, "an exported .onnx model", "bench", "models")
    with pytest.raises(UserError, match="`bench` needs an exported .onnx model; give it on the command line"):
        chain.ALONE.inputs(None, "an exported .onnx model", "bench", "models")
